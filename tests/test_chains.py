"""Chains: steps run back to back inside the engine, each with its own adapter stack and prompt."""

from __future__ import annotations

import shutil

import pytest
from test_engine import random_prompts

from gpu_worker import Engine, EngineConfig, Request, SamplingParams
from gpu_worker.chains import ChainRequest, ChainStep, OutputRef
from gpu_worker.grammar import Grammar

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True)
STACKS = (("all_r8",), ("attn_r4",), ("mlp_r16",))


@pytest.fixture(scope="module")
def engine(qwen2_dir, adapters):
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    for name in ("all_r8", "attn_r4", "mlp_r16"):
        engine.load_adapter(name, adapters[name])
    return engine


def three_step_chain(seed: int, request_id: str | None = None) -> ChainRequest:
    """Step 0 a plain prompt; step 1 splices step 0's output; step 2 splices both, later one first."""
    a, b, c = random_prompts([21, 5, 9], seed=seed)
    return ChainRequest(request_id=request_id, steps=[
        ChainStep(prompt=a, adapters=STACKS[0], params=GREEDY),
        ChainStep(prompt=b + [OutputRef(0)] + [7], adapters=STACKS[1], params=GREEDY),
        ChainStep(prompt=c + [OutputRef(1), 3, OutputRef(0)], adapters=STACKS[2], params=GREEDY),
    ])


def one_by_one(engine: Engine, chain: ChainRequest):
    """The chain's steps through the offline API, splicing earlier outputs by hand."""
    outputs = []
    for step in chain.steps:
        prompt = [t for item in step.prompt
                  for t in (outputs[item.step].token_ids if isinstance(item, OutputRef) else [item])]
        outputs += engine.generate([Request(prompt=prompt, adapters=step.adapters, params=step.params)])
    return outputs


def assert_same_steps(chained, reference):
    assert len(chained) == len(reference)
    for i, (got, want) in enumerate(zip(chained, reference)):
        assert got.prompt == want.prompt, f"step {i}: prompts differ"
        assert got.token_ids == want.token_ids, f"step {i}: tokens differ"
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5), f"step {i}: logprobs differ"


def test_three_step_chain_equals_the_steps_one_by_one(engine):
    chains = [three_step_chain(seed=41), three_step_chain(seed=42)]
    plain = Request(prompt=random_prompts([13], seed=43)[0], adapters=("attn_r4",), params=GREEDY)
    plain_id = engine.add_request(plain)  # shares the steps' batches
    done = engine.generate_chains(chains)
    plain_done = engine.take_completion(plain_id)
    for chain, completion in zip(chains, done):
        assert completion.finish_reason == "length" and completion.error is None
        assert all(c.request_id == completion.request_id for c in completion.steps)
        assert_same_steps(completion.steps, one_by_one(engine, chain))
    assert plain_done.token_ids == engine.generate([plain])[0].token_ids
    steps = [c.token_ids for c in done[0].steps]
    assert steps[0] != steps[1] != steps[2]  # each step ran its own prompt and adapters
    assert engine.blocks.num_available == engine.blocks.num_blocks and not engine.lora.in_use


def test_streaming_deltas_follow_the_steps(engine):
    chain_id = engine.add_chain(three_step_chain(seed=44, request_id="npc-7"))
    plain_id = engine.add_request(Request(prompt=[1, 2, 3], params=SamplingParams(max_tokens=20,
                                                                                  ignore_eos=True)))
    deltas = []  # (engine step, delta)
    while engine.has_unfinished():
        deltas += [(engine.num_steps, d) for d in engine.step()]
    chain = [(n, d) for n, d in deltas if d.request_id == chain_id]
    steps = [d.step for _, d in chain]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}
    assert [d.finish_reason for _, d in chain] == [None] * (len(chain) - 1) + ["length"]
    done = engine.take_chain_completion(chain_id)
    for i, completion in enumerate(done.steps):
        assert [d.token_id for _, d in chain if d.step == i] == completion.token_ids
    # No round trip between steps: step i+1's prefill runs in the engine step right after step i's end.
    for i in (1, 2):
        last = max(n for n, d in chain if d.step == i - 1)
        first = min(n for n, d in chain if d.step == i)
        assert first == last + 1
    assert {d.step for _, d in deltas if d.request_id == plain_id} == {0}
    assert engine.take_completion(plain_id).finish_reason == "length"


def test_second_turn_prefills_only_the_new_tokens_of_each_step(engine):
    a, b, c = random_prompts([40, 36, 33], seed=45)
    first = engine.generate_chains([ChainRequest(steps=[
        ChainStep(prompt=a, adapters=STACKS[0], params=GREEDY),
        ChainStep(prompt=b + [OutputRef(0)], adapters=STACKS[1], params=GREEDY),
        ChainStep(prompt=c + [OutputRef(1)], adapters=STACKS[2], params=GREEDY),
    ])])[0]
    # Turn 2: each step's prompt is its turn-1 prompt and output, then new tokens (the NPC's next turn).
    history = [s.prompt + s.token_ids for s in first.steps]
    hits_before = {stack[0]: engine.stats()["prefix_by_stack"][stack[0]]["hit_tokens"] for stack in STACKS}
    second = engine.generate_chains([ChainRequest(steps=[
        ChainStep(prompt=history[0] + [9, 9], adapters=STACKS[0], params=GREEDY),
        ChainStep(prompt=history[1] + [8, OutputRef(0)], adapters=STACKS[1], params=GREEDY),
        ChainStep(prompt=history[2] + [7, OutputRef(1)], adapters=STACKS[2], params=GREEDY),
    ])])[0]
    block = engine.config.block_size
    for i, (old, new) in enumerate(zip(first.steps, second.steps)):
        # Turn 1 computed the KV of its prompt and all outputs but the last: those full blocks hit.
        expected = (len(old.prompt) + len(old.token_ids) - 1) // block * block
        assert new.num_cached_tokens == expected > 0, f"step {i}"
        assert new.num_cached_tokens > len(new.prompt) - 2 * block  # only the new tail is prefilled
    by_stack = engine.stats()["prefix_by_stack"]
    for (name,), step in zip(STACKS, second.steps):  # each step hit the cache of its own stack
        assert by_stack[name]["hit_tokens"] - hits_before[name] == step.num_cached_tokens


def test_abort_mid_chain_skips_the_remaining_steps(engine):
    chain_id = engine.add_chain(three_step_chain(seed=46))
    seen = []
    while not any(d.step == 1 for d in seen):
        seen += [d for d in engine.step() if d.request_id == chain_id]
    assert engine.abort(chain_id) and not engine.abort(chain_id)
    while engine.has_unfinished():
        assert all(d.request_id != chain_id for d in engine.step())
    done = engine.take_chain_completion(chain_id)
    assert done.finish_reason == "abort"
    assert [s.finish_reason for s in done.steps] == ["length", "abort"]
    assert done.steps[1].token_ids == [d.token_id for d in seen if d.step == 1]
    assert engine.blocks.num_available == engine.blocks.num_blocks and not engine.lora.in_use
    waiting = engine.add_chain(three_step_chain(seed=47))  # aborted before its first step ran
    assert engine.abort(waiting)
    assert [s.finish_reason for s in engine.take_chain_completion(waiting).steps] == ["abort"]
    assert engine.stats()["chains_running"] == 0


def test_failing_step_ends_its_chain_with_an_error_while_others_finish(qwen2_dir, adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapters["all_r8"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    engine.load_adapter("attn_r4", adapters["attn_r4"])
    engine.load_adapter("broken", broken, wait=False)  # fails on the loader thread, after add_chain
    a, b = random_prompts([10, 6], seed=48)
    failing = ChainRequest(steps=[ChainStep(prompt=a, adapters=("attn_r4",), params=GREEDY),
                                  ChainStep(prompt=b + [OutputRef(0)], adapters=("broken",), params=GREEDY),
                                  ChainStep(prompt=b, params=GREEDY)])
    healthy = ChainRequest(steps=[ChainStep(prompt=b, params=GREEDY),
                                  ChainStep(prompt=a + [OutputRef(0)], adapters=("attn_r4",), params=GREEDY)])
    plain = engine.add_request(Request(prompt=a, params=GREEDY))
    failed, ok = engine.generate_chains([failing, healthy])
    assert failed.finish_reason == "error" and failed.error.startswith("step 1: ")
    assert "failed to load" in failed.error and "broken" in failed.error
    assert [s.finish_reason for s in failed.steps] == ["length", "error"]
    assert ok.finish_reason == "length" and len(ok.steps) == 2
    assert engine.take_completion(plain).finish_reason == "length"
    assert engine.blocks.num_available == engine.blocks.num_blocks


def test_grammar_step_after_a_free_step(engine, tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    talk, cue = random_prompts([12, 4], seed=49)
    act = Grammar("ebnf", 'root ::= "attack" | "flee" | "wander"')
    chains = [ChainRequest(steps=[
        ChainStep(prompt=talk, adapters=STACKS[0], params=SamplingParams(max_tokens=5, seed=seed)),
        ChainStep(prompt=talk + [OutputRef(0)] + cue, adapters=STACKS[1],
                  params=SamplingParams(max_tokens=8, temperature=1.0, seed=seed), grammar=act),
    ]) for seed in range(6)]
    for done in engine.generate_chains(chains):
        assert done.finish_reason == "stop"
        assert tokenizer.decode(done.steps[1].token_ids) in {"attack", "flee", "wander"}


def _chain(*steps, **kwargs) -> ChainRequest:
    return ChainRequest(steps=list(steps), **kwargs)


# Each message starts "ChainRequest." and then names the field.
BAD_CHAINS = {
    "no steps": (_chain(), r"steps is empty"),
    "ref to own step": (_chain(ChainStep([1]), ChainStep([OutputRef(1)])),
                        r"steps\[1\]\.prompt\[0\]: OutputRef\(step=1\) must refer to an earlier step \(0\."),
    "ref to a later step": (_chain(ChainStep([1]), ChainStep([2, OutputRef(2)]), ChainStep([3])),
                            r"steps\[1\]\.prompt\[1\]: OutputRef\(step=2\)"),
    "ref in step 0": (_chain(ChainStep([OutputRef(0)])), r"steps\[0\]\.prompt\[0\].*step 0 has none"),
    "token out of vocab": (_chain(ChainStep([1]), ChainStep([OutputRef(0), 100000])),
                           r"steps\[1\]: .*vocabulary"),
    "empty step prompt": (_chain(ChainStep([1]), ChainStep([])), r"steps\[1\]: Request\.prompt is empty"),
    "unknown adapter": (_chain(ChainStep([1]), ChainStep([2], adapters=("nobody",))),
                        r"steps\[1\]: .*unknown adapter"),
    "outputs overflow the context": (
        _chain(ChainStep([1], params=SamplingParams(max_tokens=1500)), ChainStep([2] * 600 + [OutputRef(0)])),
        r"steps\[1\]: .*context"),
    "bad grammar": (_chain(ChainStep([1], grammar=Grammar("ebnf", "root ::= nothing"))),
                    r"steps\[0\]: Request\.grammar"),
    "not a step": (_chain(ChainStep([1]), Request(prompt=[1])), r"steps\[1\] must be a ChainStep"),
    "negative priority": (_chain(ChainStep([1]), priority=-1), r"priority must be"),
    "zero deadline": (_chain(ChainStep([1]), deadline_ms=0), r"deadline_ms must be > 0"),
}


@pytest.mark.parametrize("case", list(BAD_CHAINS))
def test_bad_chain_is_rejected_naming_the_field(case, engine):
    chain, field_error = BAD_CHAINS[case]
    pattern = r"ChainRequest\." + field_error
    with pytest.raises(ValueError, match=pattern):
        engine.add_chain(chain)
    with pytest.raises(ValueError, match="chain 1: " + pattern):
        engine.generate_chains([_chain(ChainStep([1])), chain])
    assert not engine.has_unfinished() and engine.stats()["chains_running"] == 0


def test_chain_id_in_flight_is_rejected(engine):
    engine.add_chain(three_step_chain(seed=50, request_id="dup"))
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_chain(three_step_chain(seed=51, request_id="dup"))
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request(Request(prompt=[1], request_id="dup"))
    assert engine.abort("dup")
    engine.take_chain_completion("dup")
