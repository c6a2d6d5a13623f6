"""Structured outputs: grammars compiled with xgrammar, one matcher per sequence, one batched token bitmask.

    Request(prompt=ids, params=SamplingParams(temperature=0.8, max_tokens=64),
            grammar=Grammar.from_json_schema({"type": "object", ...}))

Per step, for the B rows that sample (constrained and free rows share the step):

    bitmask[:B]              int32 [B, ceil(V / 32)], filled for the constrained rows only; bit v of row b
                             is 1 when token v may come next under row b's grammar
    logits[rows] = -inf      where the bit is 0 (on a copy: the raw logits still give the logprobs)
    sample, then matcher.accept_token(token)

The sequence ends with finish_reason "stop" as soon as its output is complete under the grammar and
nothing but a stop token could follow (stop_reason None: no EOS step is spent or emitted), or when it
samples a stop token (the model's EOS ids), which the mask allows only where the grammar is complete and
the grammar could also go on (stop_reason = that token, kept in the output as for any EOS stop).
`max_tokens`, stop ids and stop strings still apply and can cut an output short.
Logprobs stay those of the raw model distribution, before the mask: what the model believed, not the
renormalized constrained distribution.

Hazards of xgrammar 0.2.8 handled here: its rule for length-bounded JSON strings (minLength / maxLength)
admits raw control characters, which strict JSON parsers reject (see `_strict_json_strings`); and its
character classes admit UTF-16 surrogates encoded as bytes, which decode to U+FFFD (valid JSON, odd text;
only a model sampling garbage emits them).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from gpu_worker.request import Sequence

GRAMMAR_KINDS = ("json_schema", "ebnf", "regex", "json")

# Compiled grammars kept (LRU). A matcher keeps its own grammar alive, so eviction never hurts a running
# sequence; the bound only stops a stream of distinct schemas from growing memory without limit.
MAX_COMPILED_GRAMMARS = 256

# Whitespace characters allowed between JSON elements. Unbounded whitespace lets a model sampling at a
# high temperature loop in spaces and newlines until max_tokens; 8 still fits indented output.
JSON_MAX_WHITESPACE = 8

_ANY_OBJECT_OR_ARRAY = '{"type": ["object", "array"]}'  # kind "json"

# xgrammar 0.2.8 writes length-bounded strings as repeats of this class, which lets U+0000..U+001F (other
# than \r \n) through; the class of its unbounded strings excludes them, as JSON requires. If a later
# version prints it differently the replacement does nothing: test_grammar checks the effect.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


@dataclass(frozen=True)
class Grammar:
    """What a constrained output must match.

    - kind "json_schema": source is a JSON schema (as a JSON string); the output is one JSON value that
      matches it (properties in the schema's order, no properties beyond the schema's).
    - kind "ebnf": source is an EBNF grammar (xgrammar / GBNF syntax) whose start rule is `root`, e.g.
      `root ::= "attack" | "flee" | "wander"`.
    - kind "regex": source is a regular expression the whole output must match, e.g. `(attack|flee) [1-9]`.
    - kind "json": any JSON object or array; source must be empty.
    """

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"Grammar.kind must be one of {list(GRAMMAR_KINDS)}, got {self.kind!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"Grammar.source must be a str, got {type(self.source).__name__}")
        if self.kind == "json" and self.source:
            raise ValueError("Grammar.source must be empty for kind 'json' (any JSON object or array)")
        if self.kind != "json" and not self.source.strip():
            raise ValueError(f"Grammar.source is empty; kind {self.kind!r} needs one")

    @classmethod
    def from_json_schema(cls, schema: dict) -> Grammar:
        return cls("json_schema", json.dumps(schema))


def load_hf_tokenizer(path: str | Path):
    """The Hugging Face fast tokenizer of a folder with tokenizer.json; ValueError when there is none."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise ValueError(f"Request.grammar needs the model's tokenizer: no tokenizer.json in {str(path)!r} "
                         f"(set EngineConfig.tokenizer)")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


class GrammarRuntime:
    """The engine's grammar state: compiler and compiled-grammar cache, batched bitmask fill and apply.

    Created by the engine on the first grammar request (importing xgrammar and loading the tokenizer
    take about a second, which engines that never see a grammar do not pay).
    """

    def __init__(self, tokenizer_path: str | Path, vocab_size: int, stop_token_ids: set[int],
                 max_rows: int, device: torch.device):
        import xgrammar as xgr

        tokenizer = load_hf_tokenizer(tokenizer_path)
        # vocab_size is the model's (its logits width), which may exceed the tokenizer's: the extra ids are
        # padding and always masked. Stop tokens are the engine's EOS ids, so the two agree on the end.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        # Our LRU below is the one cache: xgrammar's own would be a second, unbounded by default.
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.compiled: OrderedDict[Grammar, Any] = OrderedDict()  # Grammar -> xgr.CompiledGrammar, LRU
        # Without any stop token a matcher could never terminate: end at the grammar's completion instead.
        self.terminate_without_stop = not info.stop_token_ids
        self.stop_token_ids = list(info.stop_token_ids)
        self.filler = xgr.BatchGrammarMatcher()
        # One bitmask at the largest step (max_rows sampling rows), sliced per step. xgrammar fills it on
        # the CPU only; on CUDA it is pinned and copied into a device twin. The copy is asynchronous, but
        # each step ends with a host sync (token ids .tolist()) before the next fill rewrites the buffer.
        width = (vocab_size + 31) // 32
        self.bitmask = torch.full((max_rows, width), -1, dtype=torch.int32,
                                  pin_memory=device.type == "cuda")
        self.device_bitmask = self.bitmask if device.type == "cpu" else torch.empty_like(self.bitmask,
                                                                                        device=device)
        self.scratch = torch.empty((1, width), dtype=torch.int32)  # one row for `_only_stop_follows`

    def compile(self, grammar: Grammar):
        """The compiled grammar (cached); ValueError naming Request.grammar when it is invalid."""
        if not isinstance(grammar, Grammar):
            raise ValueError(f"Request.grammar must be a Grammar, got {type(grammar).__name__}")
        compiled = self.compiled.get(grammar)
        if compiled is None:
            compiled = self.compiled[grammar] = self._compile(grammar)
            if len(self.compiled) > MAX_COMPILED_GRAMMARS:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(grammar)
        return compiled

    def _compile(self, grammar: Grammar):
        try:
            if grammar.kind == "ebnf":
                return self.compiler.compile_grammar(grammar.source)
            if grammar.kind == "regex":
                return self.compiler.compile_regex(grammar.source)
            if grammar.kind == "json":  # non-strict: an object may hold any properties
                return self.compiler.compile_grammar(_json_schema_ebnf(_ANY_OBJECT_OR_ARRAY, strict=False))
            return self.compiler.compile_grammar(_json_schema_ebnf(grammar.source))
        except ValueError as e:
            raise ValueError(f"Request.grammar: invalid {grammar.kind}: {e}") from None
        except RuntimeError as e:
            # xgrammar's first line reads "[time] file.cc:line: message": keep the message.
            detail = str(e).strip().splitlines()[0].split(": ", 1)[-1]
            raise ValueError(f"Request.grammar: invalid {grammar.kind}: {detail}") from None

    def matcher(self, grammar: Grammar):
        """A fresh matcher (parser state) for one sequence."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(grammar),
                                  terminate_without_stop_token=self.terminate_without_stop)

    def fill(self, matchers: list) -> tuple[torch.Tensor, list[int]] | None:
        """Bitmask rows for one step: matchers[b] is row b's matcher, None for a free row.

        Returns (bitmask [B, ceil(V / 32)] on the logits' device, the constrained row indices), or None
        when no row is constrained. Rows not listed hold stale bits and must not be applied.
        """
        rows = [b for b, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if len(matchers) > self.bitmask.shape[0]:
            raise RuntimeError(f"{len(matchers)} sampling rows exceed the bitmask's {self.bitmask.shape[0]}")
        self.filler.batch_fill_next_token_bitmask([matchers[b] for b in rows], self.bitmask, indices=rows)
        batch_size = len(matchers)
        if self.device_bitmask is not self.bitmask:
            self.device_bitmask[:batch_size].copy_(self.bitmask[:batch_size], non_blocking=True)
        return self.device_bitmask[:batch_size], rows

    def advance(self, seq: Sequence, token: int) -> str | None:
        """Feeds a sampled token to the sequence's matcher: "stop" when the output is finished under the
        grammar, "error" (with seq.error) if the matcher rejects the token, None to go on."""
        matcher = seq.matcher
        if not matcher.accept_token(token):
            # Cannot happen when the mask was applied: a sign that mask and matcher got out of step.
            seq.error = f"grammar rejected sampled token {token}"
            return "error"
        if matcher.is_terminated():  # it accepted a stop token
            seq.stop_reason = token
            return "stop"
        return "stop" if matcher.is_completed() and self._only_stop_follows(matcher) else None

    def _only_stop_follows(self, matcher) -> bool:
        """True when no token but a stop token may come next: ending now saves a step that could only
        sample EOS. One extra bitmask fill, paid only where the grammar is complete."""
        matcher.fill_next_token_bitmask(self.scratch, 0)
        words = self.scratch[0].numpy().view(np.uint32)  # bit v of word v // 32: token v allowed
        for token in self.stop_token_ids:
            words[token // 32] &= ~np.uint32(1 << (token % 32))
        return not words.any()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """A copy of logits [B, V] with the tokens that bitmask [B, ceil(V / 32)] forbids in `rows` at -inf."""
    import xgrammar as xgr

    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask, vocab_size=logits.shape[-1], indices=rows)
    return masked


def _json_schema_ebnf(source: str, strict: bool = True) -> str:
    """The EBNF of a JSON schema, with bounded whitespace and JSON-valid characters in bounded strings;
    strict: no properties or items beyond the schema's."""
    import xgrammar as xgr

    try:
        schema = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    grammar = xgr.Grammar.from_json_schema(source, max_whitespace_cnt=JSON_MAX_WHITESPACE, strict_mode=strict)
    return _strict_json_strings(str(grammar))


def _strict_json_strings(ebnf: str) -> str:
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
