"""Engine correctness against transformers on the same random weights (float32, greedy)."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpu_worker import Engine, EngineConfig, Request, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=True, ignore_eos=True)


def random_prompts(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model_dir, prompts, max_new_tokens):
    """transformers' generate, one prompt at a time: (tokens, logprob of each chosen token)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return hf_model_greedy(model, prompts, max_new_tokens)


def hf_model_greedy(model, prompts, max_new_tokens):
    results = []
    for prompt in prompts:
        # An explicit mask: generate would otherwise treat token 0 (the pad id) in a prompt as padding.
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        results.append((tokens, logprobs))
    return results


def assert_matches(completions, reference, atol=1e-4):
    for i, (c, (tokens, logprobs)) in enumerate(zip(completions, reference)):
        assert c.token_ids == tokens, f"row {i}: tokens differ"
        assert c.logprobs == pytest.approx(logprobs, abs=atol), f"row {i}: logprobs differ"


LENGTHS = (5, 17, 40, 1, 33, 16, 64)


@pytest.fixture(scope="module")
def references(qwen2_dir, llama_dir):
    prompts = random_prompts(LENGTHS)
    return prompts, {"qwen2": hf_greedy(qwen2_dir, prompts, 10), "llama": hf_greedy(llama_dir, prompts, 10)}


SETTINGS = {
    "default": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=8),
    "tiny_pool_preemption": dict(num_kv_blocks=24, block_size=4),
    "no_prefix_cache": dict(enable_prefix_caching=False),
}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_transformers(family, setting, references, qwen2_dir, llama_dir):
    prompts, refs = references
    model_dir = {"qwen2": qwen2_dir, "llama": llama_dir}[family]
    engine = Engine(EngineConfig(model=str(model_dir), **SETTINGS[setting]))
    completions = engine.generate([Request(prompt=p, params=GREEDY) for p in prompts])
    assert_matches(completions, refs[family])
    assert all(c.finish_reason == "length" for c in completions)
    if setting == "tiny_pool_preemption":
        assert engine.stats()["preemptions"] > 0
    assert engine.blocks.num_available == engine.blocks.num_blocks  # every block back in the pool


def test_prefix_cache_hit_computes_only_the_suffix(qwen2_dir):
    shared = random_prompts([48], seed=3)[0]
    first, second = shared + [7, 8, 9], shared + [11, 12]
    engine = Engine(EngineConfig(model=str(qwen2_dir), block_size=16))
    a = engine.generate([Request(prompt=first, params=GREEDY)])[0]
    tokens_before = engine.stats()
    b = engine.generate([Request(prompt=second, params=GREEDY)])[0]
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 48  # the three full blocks of the shared prefix
    stats = engine.stats()
    assert stats["prefix_hit_tokens"] - tokens_before["prefix_hit_tokens"] == 48
    cold = Engine(EngineConfig(model=str(qwen2_dir), enable_prefix_caching=False))
    assert_matches([b], [(c.token_ids, c.logprobs) for c in cold.generate([Request(prompt=second,
                                                                                    params=GREEDY)])],
                   atol=1e-5)


def test_identical_prompt_reuses_all_but_last_token(qwen2_dir):
    prompt = random_prompts([32], seed=4)[0]
    engine = Engine(EngineConfig(model=str(qwen2_dir), block_size=16))
    a, = engine.generate([Request(prompt=prompt, params=GREEDY)])
    b, = engine.generate([Request(prompt=prompt, params=GREEDY)])
    # 32 tokens = 2 full blocks; the last token must be recomputed for its logits, so one block hits.
    assert b.num_cached_tokens == 16
    assert b.token_ids == a.token_ids and b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


def test_step_api_streams_and_aborts(qwen2_dir):
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    keep = engine.add_request(Request(prompt=[1, 2, 3], params=GREEDY, request_id="keep"))
    drop = engine.add_request(Request(prompt=[4, 5, 6], params=GREEDY, request_id="drop"))
    streamed = {keep: [], drop: []}
    for delta in engine.step():
        streamed[delta.request_id].append(delta.token_id)
    assert engine.abort(drop) and not engine.abort("nope")
    while engine.has_unfinished():
        for delta in engine.step():
            assert delta.request_id == keep
            streamed[keep].append(delta.token_id)
    assert engine.take_completion(drop).finish_reason == "abort"
    done = engine.take_completion(keep)
    assert done.token_ids == streamed[keep] and len(done.token_ids) == 10
    assert engine.blocks.num_available == engine.blocks.num_blocks


def test_priority_orders_admission(qwen2_dir):
    engine = Engine(EngineConfig(model=str(qwen2_dir), max_num_seqs=1))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request(Request(prompt=[1, 2], params=params, request_id="low", priority=5))
    engine.add_request(Request(prompt=[3, 4], params=params, request_id="high", priority=0))
    order = []
    while engine.has_unfinished():
        order += [d.request_id for d in engine.step() if d.finish_reason]
    assert order == ["high", "low"]


def test_deadline_expires_while_waiting(qwen2_dir):
    engine = Engine(EngineConfig(model=str(qwen2_dir), max_num_seqs=1))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request(Request(prompt=[1, 2], params=params, request_id="busy"))
    # Lower priority than "busy", so it waits (equal priority would admit the earliest deadline first).
    engine.add_request(Request(prompt=[3, 4], params=params, request_id="late", priority=1, deadline_ms=1))
    ends = {d.request_id: d.finish_reason for d in engine.step() if d.finish_reason}
    time.sleep(0.01)
    while engine.has_unfinished():
        ends.update({d.request_id: d.finish_reason for d in engine.step() if d.finish_reason})
    assert ends == {"busy": "length", "late": "deadline"}


def test_seeded_sampling_is_reproducible_across_batches(qwen2_dir):
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone, = engine.generate([Request(prompt=[5, 6, 7], params=params)])
    others = [Request(prompt=p, params=SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))
              for p in random_prompts([9, 20, 3], seed=9)]
    mixed = engine.generate(others[:2] + [Request(prompt=[5, 6, 7], params=params)] + others[2:])
    assert mixed[2].token_ids == alone.token_ids
    different, = engine.generate([Request(prompt=[5, 6, 7], params=SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.9, seed=4321, ignore_eos=True))])
    assert different.token_ids != alone.token_ids


def test_stop_token_ids_and_eos(qwen2_dir):
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    prompt = random_prompts([12], seed=5)[0]
    free, = engine.generate([Request(prompt=prompt, params=GREEDY)])
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped, = engine.generate([Request(prompt=prompt, params=SamplingParams(
        max_tokens=10, temperature=0.0, stop_token_ids=(stop_at,)))])
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at


def test_stop_strings_through_the_detokenizer(qwen2_dir):
    from gpu_worker.engine import load_detokenizer

    detok = load_detokenizer(qwen2_dir)
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    prompt = random_prompts([12], seed=6)[0]
    free, = engine.generate([Request(prompt=prompt, params=GREEDY)])
    text = detok(free.token_ids)
    needle = text[len(text) // 2: len(text) // 2 + 2]
    assert needle.strip(), "need a visible stop string"
    stopped, = engine.generate([Request(prompt=prompt, params=SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True, stop=(needle,)))])
    assert stopped.finish_reason == "stop" and stopped.stop_reason == needle
    assert needle in detok(stopped.token_ids) and needle not in detok(stopped.token_ids[:-1])


BAD_REQUESTS = {
    "empty prompt": (Request(prompt=[]), "prompt"),
    "token out of vocab": (Request(prompt=[1, 99999]), "vocabulary"),
    "negative token": (Request(prompt=[-1]), "vocabulary"),
    "prompt beyond context": (Request(prompt=[1] * 2048), "context"),
    "unknown adapter": (Request(prompt=[1], adapters=("nope",)), "adapter"),
    "negative priority": (Request(prompt=[1], priority=-1), "priority"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_rejected_alone(case, qwen2_dir, engine_for_errors):
    request, word = BAD_REQUESTS[case]
    engine = engine_for_errors
    good = engine.add_request(Request(prompt=[1, 2, 3], params=GREEDY))
    with pytest.raises(ValueError, match=word):
        engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    assert engine.take_completion(good).finish_reason == "length"


@pytest.fixture(scope="module")
def engine_for_errors(qwen2_dir):
    return Engine(EngineConfig(model=str(qwen2_dir)))


def test_generate_names_the_bad_request(qwen2_dir, engine_for_errors):
    with pytest.raises(ValueError, match="request 1: .*vocabulary"):
        engine_for_errors.generate([Request(prompt=[1]), Request(prompt=[100000])])
    assert not engine_for_errors.has_unfinished()


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                          ("top_k", -5)])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_model_folders(tmp_path, qwen2_dir):
    import json
    import shutil

    with pytest.raises(ValueError, match="config.json"):
        Engine(EngineConfig(model=str(tmp_path)))
    bad_type = tmp_path / "gpt"
    shutil.copytree(qwen2_dir, bad_type)
    cfg = json.loads((bad_type / "config.json").read_text())
    (bad_type / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        Engine(EngineConfig(model=str(bad_type)))
    no_weights = tmp_path / "noweights"
    shutil.copytree(qwen2_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        Engine(EngineConfig(model=str(no_weights)))
    wrong_shape = tmp_path / "wrong"
    shutil.copytree(qwen2_dir, wrong_shape)
    (wrong_shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="shape"):
        Engine(EngineConfig(model=str(wrong_shape)))


def test_bad_engine_config_names_the_field():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="x", dtype="int3")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model="x", quantization="gptq")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="x", block_size=0)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_torch_paths_without_native_ops_match_transformers(family, references, qwen2_dir, llama_dir,
                                                           monkeypatch):
    """The torch paths (what CUDA and machines without a compiler run) for attention, RoPE, add + norm."""
    monkeypatch.setenv("NPC_DISABLE_CPU_OPS", "1")
    prompts, refs = references
    model_dir = {"qwen2": qwen2_dir, "llama": llama_dir}[family]
    engine = Engine(EngineConfig(model=str(model_dir), max_num_batched_tokens=16))
    assert_matches(engine.generate([Request(prompt=p, params=GREEDY) for p in prompts]), refs[family])


def test_refusals_carry_their_reason(engine_for_errors):
    """The worker maps these reasons to protocol codes; the reason travels on the exception, not the text."""
    from gpu_worker.request import RequestRejected

    cases = {RequestRejected.TOKEN_OUT_OF_RANGE: Request(prompt=[1, 99999]),
             RequestRejected.UNKNOWN_ADAPTER: Request(prompt=[1], adapters=("nope",))}
    for reason, request in cases.items():
        with pytest.raises(RequestRejected) as info:
            engine_for_errors.add_request(request)
        assert info.value.reason == reason
    rid = engine_for_errors.add_request(Request(prompt=[1], params=GREEDY, request_id="twice"))
    with pytest.raises(RequestRejected) as info:
        engine_for_errors.add_request(Request(prompt=[1], request_id="twice"))
    assert info.value.reason == RequestRejected.DUPLICATE
    engine_for_errors.abort(rid)


def test_stop_string_late_in_a_long_output(qwen2_dir):
    """Only a tail of the output is decoded per step: a stop string far from the start is still found."""
    from gpu_worker.engine import load_detokenizer

    detok = load_detokenizer(qwen2_dir)
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    prompt = random_prompts([7], seed=8)[0]
    # Seeded sampling: varied text (greedy on the random model repeats itself), the same tokens each run.
    long_params = SamplingParams(max_tokens=48, temperature=1.0, seed=5, ignore_eos=True)
    free, = engine.generate([Request(prompt=prompt, params=long_params)])
    def first_stop(needle):  # shortest output prefix whose text holds the needle
        return next((i for i in range(1, 49) if needle in detok(free.token_ids[:i])), None)

    candidates = (detok(free.token_ids[i:i + 2]) for i in range(20, 46))
    needle = next(c for c in candidates if c.strip() and "\ufffd" not in c and (first_stop(c) or 0) > 24)
    stopped, = engine.generate([Request(prompt=prompt, params=SamplingParams(
        max_tokens=48, temperature=1.0, seed=5, ignore_eos=True, stop=(needle,)))])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first_stop(needle)]
