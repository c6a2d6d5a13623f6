"""Structured outputs: grammar-constrained rows of a random model always match their grammar.

A random model samples garbage at temperature 1.0, so an output that always parses shows that the mask
works; free rows in the same batch must stay exactly what they are alone.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from test_engine import GREEDY, random_prompts
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from gpu_worker import Engine, EngineConfig, Request, SamplingParams
from gpu_worker.grammar import Grammar

ACTIONS = ("attack", "flee", "wander", "talk")
ACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"enum": list(ACTIONS)},
        "target": {"type": "string", "pattern": "^[a-z_][a-z_0-9]{0,7}$"},
        "line": {"type": "string", "maxLength": 6},  # a length-bounded string: see _strict_json_strings
        "urgency": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["action", "target", "line", "urgency"],
}
ACTION_EBNF = 'root ::= "attack" | "flee" | "wander"'
# Every output of ACTION_SCHEMA fits: at most 8 whitespace characters per gap, bounded strings.
SAMPLED = dict(max_tokens=256, temperature=1.0)


@pytest.fixture(scope="module")
def engine(qwen2_dir):
    return Engine(EngineConfig(model=str(qwen2_dir)))


@pytest.fixture(scope="module")
def tokenizer(qwen2_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(qwen2_dir))


def matches_action_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) == set(ACTION_SCHEMA["required"])
            and value["action"] in ACTIONS and re.fullmatch(r"[a-z_][a-z_0-9]{0,7}", value["target"])
            and isinstance(value["line"], str)
            and type(value["urgency"]) is int and 0 <= value["urgency"] <= 9)


def test_constrained_rows_always_parse_and_free_rows_are_unchanged(engine, tokenizer):
    grammar = Grammar.from_json_schema(ACTION_SCHEMA)
    constrained = [Request(prompt=p, params=SamplingParams(seed=seed, **SAMPLED), grammar=grammar)
                   for seed, p in enumerate(random_prompts([3, 9, 20, 5] * 5, seed=31))]
    free = [Request(prompt=p, params=GREEDY) for p in random_prompts([7, 18, 33], seed=32)]
    mixed = engine.generate(constrained[:10] + free[:2] + constrained[10:] + free[2:])
    free_out = mixed[10:12] + mixed[-1:]
    for c in mixed[:10] + mixed[12:-1]:
        assert c.finish_reason == "stop" and c.stop_reason is None  # ended at the grammar's end: no EOS
        value = json.loads(tokenizer.decode(c.token_ids))  # strict: raw control characters would fail
        assert matches_action_schema(value), value
    alone = engine.generate(free)
    for got, want in zip(free_out, alone):
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert len(engine._grammars.compiled) >= 1 and grammar in engine._grammars.compiled


def test_ebnf_action_grammar_yields_one_of_its_strings(engine, tokenizer):
    grammar = Grammar("ebnf", ACTION_EBNF)
    requests = [Request(prompt=p, params=SamplingParams(seed=seed, **SAMPLED), grammar=grammar)
                for seed, p in enumerate(random_prompts([4, 11] * 8, seed=33))]
    requests.append(Request(prompt=[1, 2, 3], params=SamplingParams(max_tokens=16, temperature=0.0),
                            grammar=grammar))
    outputs = engine.generate(requests)
    texts = [tokenizer.decode(c.token_ids) for c in outputs]
    assert set(texts) <= {"attack", "flee", "wander"} and len(set(texts)) > 1, texts
    assert all(c.finish_reason == "stop" for c in outputs)


def test_regex_grammar_matches_the_whole_output(engine, tokenizer):
    pattern = "(attack|flee) [1-9]"
    requests = [Request(prompt=[seed + 1, 2], params=SamplingParams(seed=seed, **SAMPLED),
                        grammar=Grammar("regex", pattern)) for seed in range(8)]
    for c in engine.generate(requests):
        assert c.finish_reason == "stop" and re.fullmatch(pattern, tokenizer.decode(c.token_ids))


def test_logprobs_are_the_raw_model_distribution(engine, qwen2_dir):
    prompt = random_prompts([12], seed=34)[0]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=True)
    out, = engine.generate([Request(prompt=prompt, params=params, grammar=Grammar("ebnf", ACTION_EBNF))])
    model = AutoModelForCausalLM.from_pretrained(str(qwen2_dir), dtype=torch.float32)
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    positions = range(len(prompt) - 1, len(prompt) + len(out.token_ids) - 1)
    raw = [torch.log_softmax(logits[p], -1)[t].item() for p, t in zip(positions, out.token_ids)]
    assert out.logprobs == pytest.approx(raw, abs=1e-4)
    assert max(out.logprobs) < -0.01  # after the first token the grammar forces them; the model does not


def test_length_bounded_strings_reject_control_characters(engine):
    # xgrammar 0.2.8 lets raw U+0000..U+001F into strings with minLength / maxLength; JSON forbids them.
    bounded = {"type": "string", "maxLength": 4}
    grammar = Grammar.from_json_schema({"type": "object", "properties": {"s": bounded}, "required": ["s"]})
    engine.validate(Request(prompt=[1], grammar=grammar))
    for text, ok in (('{"s": "ab"}', True), ('{"s": "a\tb"}', False), ('{"s": "a\x0bb"}', False)):
        matcher = engine._grammars.matcher(grammar)
        assert (matcher.accept_string(text) and matcher.is_completed()) == ok, text


def test_any_json_grammar(engine):
    engine.validate(Request(prompt=[1], grammar=Grammar("json")))
    matcher = engine._grammars.matcher(Grammar("json"))
    assert matcher.accept_string('{"a": [1, 2.5, "x"], "b": null}') and matcher.is_completed()


BAD_GRAMMARS = {
    "unsupported schema type": (lambda: Grammar("json_schema", '{"type": "foo"}'), "invalid json_schema"),
    "schema is not JSON": (lambda: Grammar("json_schema", "{type: object"), "not valid JSON"),
    "schema is a list": (lambda: Grammar("json_schema", "[1]"), "object"),
    "undefined EBNF rule": (lambda: Grammar("ebnf", "root ::= action"), "invalid ebnf"),
    "EBNF without root": (lambda: Grammar("ebnf", 'act ::= "flee"'), "root"),
    "unbalanced regex": (lambda: Grammar("regex", "(attack"), "invalid regex"),
    "not a Grammar": (lambda: {"kind": "json"}, "Request.grammar"),
}


@pytest.mark.parametrize("case", list(BAD_GRAMMARS))
def test_bad_grammar_is_rejected_for_that_request_only(case, engine):
    make, words = BAD_GRAMMARS[case]
    good = engine.add_request(Request(prompt=[1, 2, 3], params=GREEDY))
    with pytest.raises(ValueError, match=words):
        engine.add_request(Request(prompt=[4, 5], grammar=make()))
    while engine.has_unfinished():
        engine.step()
    assert engine.take_completion(good).finish_reason == "length"


@pytest.mark.parametrize("kwargs, words", [(dict(kind="lark", source="start: 'a'"), "kind"),
                                           (dict(kind="ebnf", source=" "), "empty"),
                                           (dict(kind="json", source="{}"), "must be empty")])
def test_bad_grammar_fields_name_the_field(kwargs, words):
    with pytest.raises(ValueError, match=f"Grammar.*{words}"):
        Grammar(**kwargs)


def test_grammar_without_a_tokenizer_is_a_value_error(qwen2_dir, tmp_path):
    model_only = tmp_path / "model"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(qwen2_dir / name, model_only / name)
    engine = Engine(EngineConfig(model=str(model_only)))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request(Request(prompt=[1, 2], grammar=Grammar("ebnf", ACTION_EBNF)))
    assert engine.generate([Request(prompt=[1, 2], params=GREEDY)])[0].finish_reason == "length"
    with_tokenizer = Engine(EngineConfig(model=str(model_only), tokenizer=str(qwen2_dir)))
    out, = with_tokenizer.generate([Request(prompt=[1, 2], grammar=Grammar("ebnf", ACTION_EBNF))])
    assert out.finish_reason == "stop"
