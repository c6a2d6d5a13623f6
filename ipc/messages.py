"""Every wire message of the scheduler <-> worker protocol, with one encode/decode path (ipc/PROTOCOL.md).

A message is a frozen dataclass registered under its type code. `encode(msg)` gives its metadata map
(plain msgpack values; fields equal to their default are left out) and its arrays (int32, in field order);
`decode(type, body, arrays, limits)` checks every field's type and range (ipc/schema.py), then the
message's own cross-field rules, and raises ProtocolError(code, message) naming the field, e.g.
`params_table[1]: SamplingParams.top_p must be in (0, 1], got 1.5`. Where the arrays travel (payload
frames or a shared-memory slot) is the transport's business (ipc/frames.py); the fixed header frame lives
here because every transport shares it.

A batch is sent column-wise: one entry per request in each per-request column (request_id, prompt, ...)
and the values requests share (adapter stacks, sampling settings, grammars) once each, in tables the
columns index. 64 requests of a tick use a handful of distinct settings, so each is checked once.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import typing
from dataclasses import dataclass, field
from enum import IntEnum

import msgpack
import numpy as np

from gpu_worker.request import Completion, Request, TokenDelta
from gpu_worker.sampling_params import SamplingParams
from ipc.errors import ErrorCode, ProtocolError
from ipc.schema import FieldError, Rule, Schema, array_fields, kind, rule, shared_value, to_wire

# --- header frame -----------------------------------------------------------------------------------------

MAGIC = b"NPCW"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
# magic, version, type, corr_id, flags, meta_len, payload_frames, reserved, payload_bytes: 32 bytes, every
# field at an offset that is a multiple of its size, so a C struct maps it without packing pragmas.
HEADER = struct.Struct("<4sHHQIIHHI")
FLAG_SHM = 0x1  # the arrays sit in the sender's shared-memory ring, not in payload frames
KNOWN_FLAGS = FLAG_SHM

U16, U32, I32, U64 = 2**16 - 1, 2**32 - 1, 2**31 - 1, 2**64 - 1


class MsgType(IntEnum):
    # client -> worker; each is answered by the type | 0x80 (or by ERROR)
    HELLO = 0x01
    SUBMIT_BATCH = 0x02
    ABORT = 0x03
    ADAPTER_LOAD = 0x04
    ADAPTER_UNLOAD = 0x05
    ADAPTER_PIN = 0x06
    WARM_PREFIX = 0x07
    STATS = 0x08
    HEARTBEAT = 0x09
    GOODBYE = 0x0A
    # worker -> client, unsolicited: their corr_id is a per-client sequence number (1, 2, ...)
    TOKEN_DELTAS = 0x40
    COMPLETIONS = 0x41
    # worker -> client replies
    HELLO_REPLY = 0x81
    BATCH_ACK = 0x82
    ABORT_REPLY = 0x83
    ADAPTER_LOAD_REPLY = 0x84
    ADAPTER_UNLOAD_REPLY = 0x85
    ADAPTER_PIN_REPLY = 0x86
    WARM_PREFIX_REPLY = 0x87
    STATS_REPLY = 0x88
    HEARTBEAT_REPLY = 0x89
    GOODBYE_REPLY = 0x8A
    ERROR = 0xFF


CLIENT_TYPES = frozenset(t for t in MsgType if t < 0x40)  # what a worker accepts
WORKER_TYPES = frozenset(t for t in MsgType if t >= 0x40)  # what a client accepts
REPLY_BIT = 0x80


@dataclass(frozen=True)
class Header:
    msg_type: int
    corr_id: int
    flags: int = 0
    meta_len: int = 0
    payload_frames: int = 0
    payload_bytes: int = 0
    version: int = VERSION

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.msg_type, self.corr_id, self.flags, self.meta_len,
                           self.payload_frames, 0, self.payload_bytes)

    @classmethod
    def parse(cls, data: bytes | memoryview) -> Header:
        """The header frame, checked; errors after the magic name the message (corr_id, type)."""
        if len(data) != HEADER.size:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME,
                                f"header frame must be {HEADER.size} bytes, got {len(data)}")
        magic, version, msg_type, corr_id, flags, meta_len, frames, reserved, payload = HEADER.unpack(data)
        if magic != MAGIC:  # not our protocol: the other fields mean nothing, so nothing is attributed
            raise ProtocolError(ErrorCode.BAD_MAGIC, f"magic must be {MAGIC!r}, got {magic!r}")
        header = cls(msg_type, corr_id, flags, meta_len, frames, payload, version)
        if version not in SUPPORTED_VERSIONS:
            raise header.error(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version} is not supported "
                                                              f"(supported: {SUPPORTED_VERSIONS})")
        if flags & ~KNOWN_FLAGS:
            raise header.error(ErrorCode.BAD_FLAGS, f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:x}")
        if reserved:
            raise header.error(ErrorCode.MALFORMED_FRAME, f"reserved header field must be 0, got {reserved}")
        return header

    def error(self, code: ErrorCode, message: str) -> ProtocolError:
        return ProtocolError(code, message, corr_id=self.corr_id, ref_type=self.msg_type)


# --- limits -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; anything beyond is refused with LIMIT_EXCEEDED or TOO_LARGE.

    Strings are measured in Unicode code points (a string whose UTF-8 length is within a limit passes).
    """

    max_frame_bytes: int = 8 << 20  # any one frame
    max_meta_bytes: int = 1 << 20  # the metadata frame
    max_requests: int = 1024  # requests of one batch (and entries of each table, ids of one ABORT)
    max_batch_tokens: int = 1 << 20  # tokens of one packed array (4 MiB of int32)
    max_segments: int = 8192  # token segments of one packed array
    max_prompt_tokens: int = 131072  # tokens of one request's prompt segment
    max_new_tokens: int = 32768  # SamplingParams.max_tokens
    max_adapters: int = 4  # adapters of one stack (task + subfaction + NPC delta, and one spare)
    max_chain_steps: int = 8  # chain steps after the request's own step
    max_parts: int = 16  # prompt parts of one chain step
    max_stop: int = 64  # stop strings, and stop token ids, of one SamplingParams
    max_string: int = 4096  # any string without a tighter rule (stop strings, paths, error texts)
    max_grammar_chars: int = 65536  # one grammar's text
    max_items: int = 65536  # any array without a tighter rule (deltas, results, generated token ids)
    max_ring_bytes: int = 1 << 30  # one client's shared-memory segment
    max_clients: int = 256  # clients with a mapped ring at once
    vocab_size: int | None = None  # token ids must lie in [0, vocab_size); None checks only >= 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "vocab_size" and value is None:
                continue
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{f.name} must be an int >= 1, got {value!r}")
        if 4 * self.max_batch_tokens > self.max_frame_bytes:
            raise ValueError(f"Limits.max_batch_tokens ({self.max_batch_tokens}) int32 tokens must fit in "
                             f"max_frame_bytes ({self.max_frame_bytes})")

    @property
    def max_steps(self) -> int:
        return self.max_chain_steps + 1

    def to_wire(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name)}


# --- field rules ------------------------------------------------------------------------------------------

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # registry names: vampire.dialogue_style
LABEL = re.compile(r"[\x21-\x7e]{0,128}")  # client and worker ids
SEGMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # no "/": the name cannot leave shm_dir
FINISH_REASONS = frozenset({"stop", "length", "abort", "deadline", "error"})
GRAMMAR_KINDS = frozenset({"json", "json_schema", "ebnf", "regex"})
DEADLINE_MS_MAX = 86_400_000.0  # one day
NO_GRAMMAR = -1  # grammar index of a request without one

# Rules for the engine's SamplingParams, whose class carries none (its own __post_init__ checks ranges).
_FOREIGN_RULES = {
    (SamplingParams, "max_tokens"): Rule(lo=1, hi="max_new_tokens"),
    (SamplingParams, "top_k"): Rule(lo=-1, hi=I32),
    (SamplingParams, "seed"): Rule(lo=0, hi=2**63 - 1),
    (SamplingParams, "stop_token_ids"): Rule(lo=0, hi=I32, max_items="max_stop"),
    (SamplingParams, "stop"): Rule(max_items="max_stop"),
}
shared_value(SamplingParams)  # a handful per tick, shared by many requests

# --- messages ---------------------------------------------------------------------------------------------

MESSAGES: dict[int, type] = {}
TRANSPORT_KEYS = frozenset({"arrays", "shm"})  # metadata keys of the frame layer, never message fields


def message(msg_type: MsgType):
    """Registers a message dataclass under its wire type code."""

    def register(cls: type) -> type:
        clash = TRANSPORT_KEYS & {f.name for f in dataclasses.fields(cls)}
        if clash:
            raise TypeError(f"{cls.__name__} uses the transport's metadata keys {sorted(clash)}")
        cls.TYPE = msg_type
        MESSAGES[msg_type] = cls
        return cls

    return register


@dataclass(frozen=True)
class RingInfo:
    """Where the client's shared-memory ring is: /dev/shm/<name> (shm_open("/<name>")) on Linux."""

    name: str = rule(pattern=SEGMENT_NAME)
    slots: int = rule(lo=1, hi=4096)
    slot_bytes: int = rule(lo=64, hi=1 << 30)


@message(MsgType.HELLO)
@dataclass(frozen=True)
class Hello:
    client_id: str = rule("", pattern=LABEL)
    ring: RingInfo | None = None  # None: this client sends arrays inline only


@message(MsgType.HELLO_REPLY)
@dataclass(frozen=True)
class HelloReply:
    worker_id: str = rule(pattern=LABEL)
    versions: tuple[int, ...] = rule(SUPPORTED_VERSIONS, lo=1, hi=U16, max_items=16)
    ring_mapped: bool = False  # the worker mapped the client's ring: arrays may go through it from now on
    ring_error: str | None = None  # why not, when the client offered one
    vocab_size: int = rule(0, lo=0, hi=I32)  # 0: unknown
    max_model_len: int = rule(0, lo=0, hi=I32)
    limits: dict = field(default_factory=dict)  # the worker's Limits, field -> int


@shared_value
@dataclass(frozen=True)
class Grammar:
    """A structured-output constraint, compiled by the worker with xgrammar ("json": any JSON value)."""

    kind: str = rule(choices=GRAMMAR_KINDS)
    text: str = rule("", max_len="max_grammar_chars")


@dataclass(frozen=True)
class Part:
    """One piece of a chain step's prompt: a token segment of the batch, or an earlier step's output."""

    segment: int | None = rule(None, lo=0, hi=I32)
    output_of: int | None = rule(None, lo=0, hi=I32)  # 0 is the request's own step

    def __post_init__(self) -> None:
        if (self.segment is None) == (self.output_of is None):
            raise ValueError("a part must set exactly one of 'segment' and 'output_of'")


@dataclass(frozen=True)
class ChainStep:
    """A chain step on the wire: its prompt parts, and indices into the batch's tables."""

    parts: tuple[Part, ...] = rule(max_items="max_parts")
    stack: int = rule(0, lo=0, hi=I32)
    params: int = rule(0, lo=0, hi=I32)
    grammar: int = rule(NO_GRAMMAR, lo=NO_GRAMMAR, hi=I32)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a chain step needs at least one part")


@dataclass(frozen=True)
class Chain:
    """Steps 1, 2, ... run inside the worker after request `request`'s own step (step 0)."""

    request: int = rule(lo=0, hi=I32)
    steps: tuple[ChainStep, ...] = rule(max_items="max_chain_steps")


@dataclass(frozen=True)
class Step:
    """A chain step as callers see it: prompt parts, adapter stack, sampling and stop rules, grammar."""

    parts: tuple[Part, ...]
    adapters: tuple[str, ...] = ()
    params: SamplingParams = SamplingParams()
    grammar: Grammar | None = None


@dataclass(frozen=True)
class RequestSpec:
    """One request of a batch, read out of its columns and tables (SubmitBatch.spec); not a wire type."""

    request_id: str
    prompt: int  # index of its prompt's token segment
    adapters: tuple[str, ...] = ()
    params: SamplingParams = SamplingParams()
    priority: int = 0
    deadline_ms: float | None = None
    grammar: Grammar | None = None
    chain: tuple[Step, ...] = ()


@message(MsgType.SUBMIT_BATCH)
@dataclass(frozen=True, eq=False)
class SubmitBatch:
    """Requests column-wise, their token segments packed: segment j is tokens[offsets[j]:offsets[j + 1]].

    Per-request columns hold one entry per request; an empty optional column means every request takes
    the default (stack 0, params 0, priority 0, no deadline, no grammar).
    """

    request_id: tuple[str, ...] = rule(pattern=REQUEST_ID, max_items="max_requests")
    prompt: tuple[int, ...] = rule(lo=0, hi=I32, max_items="max_requests")  # segment index
    tokens: np.ndarray = rule()  # int32 [T]
    offsets: np.ndarray = rule()  # int32 [S + 1]: 0, ..., T
    stack: tuple[int, ...] = rule((), lo=0, hi=I32, max_items="max_requests")  # into stack_table
    params: tuple[int, ...] = rule((), lo=0, hi=I32, max_items="max_requests")  # into params_table
    priority: tuple[int, ...] = rule((), lo=0, hi=I32, max_items="max_requests")  # 0 is the highest
    deadline_ms: tuple[float | None, ...] = rule((), lo=0, hi=DEADLINE_MS_MAX, max_items="max_requests")
    grammar: tuple[int, ...] = rule((), lo=NO_GRAMMAR, hi=I32, max_items="max_requests")  # -1: none
    stack_table: tuple[tuple[str, ...], ...] = rule(((),), pattern=ADAPTER_NAME, max_items="max_adapters",
                                                    max_rows="max_requests")
    params_table: tuple[SamplingParams, ...] = rule((SamplingParams(),), max_items="max_requests")
    grammar_table: tuple[Grammar, ...] = rule((), max_items="max_requests")
    chains: tuple[Chain, ...] = rule((), max_items="max_requests")

    def __len__(self) -> int:
        return len(self.request_id)

    def segment(self, index: int) -> np.ndarray:
        """Segment `index` as a view of the packed tokens (into the ring when it came by shared memory)."""
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def prompt_tokens(self, i: int) -> np.ndarray:
        return self.segment(self.prompt[i])

    def spec(self, i: int) -> RequestSpec:
        """Request i with its table entries looked up."""
        grammar = _column(self.grammar, i, NO_GRAMMAR)
        chain = next((c for c in self.chains if c.request == i), None)
        return RequestSpec(
            self.request_id[i], self.prompt[i], self.stack_table[_column(self.stack, i, 0)],
            self.params_table[_column(self.params, i, 0)], _column(self.priority, i, 0),
            _column(self.deadline_ms, i, None),
            None if grammar == NO_GRAMMAR else self.grammar_table[grammar],
            () if chain is None else tuple(self._step(s) for s in chain.steps))

    def _step(self, step: ChainStep) -> Step:
        grammar = None if step.grammar == NO_GRAMMAR else self.grammar_table[step.grammar]
        return Step(step.parts, self.stack_table[step.stack], self.params_table[step.params], grammar)

    def engine_request(self, i: int) -> Request:
        """Request i as the engine takes it; its prompt is copied out, so the ring slot may go back after."""
        spec = self.spec(i)
        return Request(prompt=self.prompt_tokens(i).tolist(), adapters=spec.adapters, params=spec.params,
                       request_id=spec.request_id, priority=spec.priority, deadline_ms=spec.deadline_ms)

    def check(self, limits: Limits) -> None:
        n = len(self.request_id)
        if n == 0:
            raise ProtocolError(ErrorCode.BAD_FIELD, "request_id: a batch needs at least one request")
        _check_columns(self, n)
        lengths = _check_packed(self.tokens, self.offsets, limits)
        _check_prompts(self, lengths, limits)
        _check_indices(self)
        _check_unique(self.request_id)
        for j, params in enumerate(self.params_table):
            _check_stop_ids(f"params_table[{j}]", params, limits)
        chained: set[int] = set()
        for chain in self.chains:
            _check_chain(self, chain, n, len(lengths))
            if chain.request in chained:
                raise _request_error(self, chain.request, ErrorCode.BAD_FIELD, "chains: more than one chain")
            chained.add(chain.request)


@message(MsgType.BATCH_ACK)
@dataclass(frozen=True)
class BatchAck:
    """The worker has taken the batch in (and no longer reads its ring slot)."""

    accepted: int = rule(0, lo=0, hi=U32)
    rejected: tuple[Rejection, ...] = rule((), max_items="max_requests")


@dataclass(frozen=True)
class Rejection:
    """A request of an accepted batch that the worker could not take (unknown adapter, queue full...)."""

    request_id: str = rule(pattern=REQUEST_ID)
    code: int = rule(lo=0, hi=U16)  # an ErrorCode
    message: str = rule("")


@message(MsgType.ABORT)
@dataclass(frozen=True)
class Abort:
    request_ids: tuple[str, ...] = rule(pattern=REQUEST_ID, max_items="max_requests")


@message(MsgType.ABORT_REPLY)
@dataclass(frozen=True)
class AbortReply:
    aborted: tuple[str, ...] = rule((), pattern=REQUEST_ID, max_items="max_requests")
    unknown: tuple[str, ...] = rule((), pattern=REQUEST_ID, max_items="max_requests")


@message(MsgType.ADAPTER_LOAD)
@dataclass(frozen=True)
class AdapterLoad:
    name: str = rule(pattern=ADAPTER_NAME)
    path: str | None = None  # a PEFT folder on the worker's host; None: the worker's adapter registry
    pin: bool = False


@message(MsgType.ADAPTER_UNLOAD)
@dataclass(frozen=True)
class AdapterUnload:
    name: str = rule(pattern=ADAPTER_NAME)


@message(MsgType.ADAPTER_PIN)
@dataclass(frozen=True)
class AdapterPin:
    name: str = rule(pattern=ADAPTER_NAME)
    pinned: bool = True


@dataclass(frozen=True)
class AdapterReply:
    name: str = rule(pattern=ADAPTER_NAME)
    resident: bool = False  # loaded in the worker's adapter slots
    pinned: bool = False


@message(MsgType.ADAPTER_LOAD_REPLY)
class AdapterLoadReply(AdapterReply):
    pass


@message(MsgType.ADAPTER_UNLOAD_REPLY)
class AdapterUnloadReply(AdapterReply):
    pass


@message(MsgType.ADAPTER_PIN_REPLY)
class AdapterPinReply(AdapterReply):
    pass


@message(MsgType.WARM_PREFIX)
@dataclass(frozen=True, eq=False)
class WarmPrefix:
    """Prefill every segment under its adapter stack into the prefix cache; nothing is sampled."""

    tokens: np.ndarray = rule()  # int32 [T], packed as in SUBMIT_BATCH
    offsets: np.ndarray = rule()  # int32 [S + 1]
    stack: tuple[int, ...] = rule((), lo=0, hi=I32, max_items="max_segments")  # per segment; empty: all 0
    stack_table: tuple[tuple[str, ...], ...] = rule(((),), pattern=ADAPTER_NAME, max_items="max_adapters",
                                                    max_rows="max_requests")

    def segment(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def adapters(self, index: int) -> tuple[str, ...]:
        return self.stack_table[_column(self.stack, index, 0)]

    def check(self, limits: Limits) -> None:
        lengths = _check_packed(self.tokens, self.offsets, limits)
        for j, length in enumerate(lengths):
            if not 1 <= length <= limits.max_prompt_tokens:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"offsets: segment {j} has {length} tokens; must be "
                                    f"1..{limits.max_prompt_tokens}")
        if self.stack and len(self.stack) != len(lengths):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"stack: {len(self.stack)} entries for {len(lengths)} "
                                f"segments")
        _check_index("stack", self.stack, len(self.stack_table), "stack_table")


@message(MsgType.WARM_PREFIX_REPLY)
@dataclass(frozen=True)
class WarmPrefixReply:
    cached_tokens: tuple[int, ...] = rule((), lo=0, hi=I32, max_items="max_segments")  # per segment


@message(MsgType.STATS)
@dataclass(frozen=True)
class Stats:
    pass


@message(MsgType.STATS_REPLY)
@dataclass(frozen=True)
class StatsReply:
    stats: dict = field(default_factory=dict)  # Engine.stats() and the endpoint's counters


@message(MsgType.HEARTBEAT)
@dataclass(frozen=True)
class Heartbeat:
    seq: int = rule(0, lo=0, hi=U64)


@message(MsgType.HEARTBEAT_REPLY)
@dataclass(frozen=True)
class HeartbeatReply:
    seq: int = rule(0, lo=0, hi=U64)  # echoed
    worker_id: str = rule("", pattern=LABEL)
    running: int = rule(0, lo=0, hi=U32)
    waiting: int = rule(0, lo=0, hi=U32)
    draining: bool = False  # shutting down: finishing in-flight work, taking no new batches


@message(MsgType.GOODBYE)
@dataclass(frozen=True)
class Goodbye:
    pass


@message(MsgType.GOODBYE_REPLY)
@dataclass(frozen=True)
class GoodbyeReply:
    pass


@dataclass(frozen=True)
class Delta:
    """One step's news for one request (the engine's TokenDelta) and the chain step it belongs to."""

    request_id: str = rule(pattern=REQUEST_ID)
    token_id: int | None = rule(None, lo=0, hi=I32)
    logprob: float | None = rule(None, finite=False)  # natural log; -inf is possible
    finish_reason: str | None = rule(None, choices=FINISH_REASONS)
    error: str | None = None
    step: int = rule(0, lo=0, hi="max_chain_steps")

    @classmethod
    def from_engine(cls, delta: TokenDelta, step: int = 0) -> Delta:
        return cls(delta.request_id, delta.token_id, delta.logprob, delta.finish_reason, delta.error, step)


@message(MsgType.TOKEN_DELTAS)
@dataclass(frozen=True)
class TokenDeltas:
    deltas: tuple[Delta, ...] = ()


@dataclass(frozen=True)
class StepResult:
    token_ids: tuple[int, ...] = rule((), lo=0, hi=I32, max_items="max_new_tokens")
    logprobs: tuple[float, ...] | None = rule(None, finite=False, max_items="max_new_tokens")
    finish_reason: str = rule("length", choices=FINISH_REASONS)
    num_cached_tokens: int = rule(0, lo=0, hi=I32)
    stop_reason: int | str | None = rule(None, lo=0, hi=I32)  # the stop token id or stop string
    error: str | None = None

    @classmethod
    def from_engine(cls, c: Completion) -> StepResult:
        return cls(tuple(c.token_ids), None if c.logprobs is None else tuple(c.logprobs), c.finish_reason,
                   c.num_cached_tokens, c.stop_reason, c.error)


@dataclass(frozen=True)
class RequestResult:
    """A finished request: one StepResult per step (a plain request has one)."""

    request_id: str = rule(pattern=REQUEST_ID)
    finish_reason: str = rule(choices=FINISH_REASONS)
    steps: tuple[StepResult, ...] = rule((), max_items="max_steps")
    error: str | None = None

    @classmethod
    def from_engine(cls, c: Completion) -> RequestResult:
        return cls(c.request_id, c.finish_reason, (StepResult.from_engine(c),), c.error)


@message(MsgType.COMPLETIONS)
@dataclass(frozen=True)
class Completions:
    results: tuple[RequestResult, ...] = ()


@message(MsgType.ERROR)
@dataclass(frozen=True)
class Error:
    code: int = rule(lo=0, hi=U16)  # an ErrorCode (a client must accept codes it does not know)
    message: str = rule("")
    request_id: str | None = rule(None, pattern=REQUEST_ID)
    ref_type: int = rule(0, lo=0, hi=U16)  # type of the message this answers; 0 when unknown

    @classmethod
    def from_exception(cls, e: ProtocolError) -> Error:
        request_id = e.request_id if e.request_id and REQUEST_ID.fullmatch(e.request_id) else None
        return cls(int(e.code), e.message, request_id, e.ref_type if 0 <= e.ref_type <= U16 else 0)


Message = typing.Any  # any registered dataclass above


# --- checks across fields ---------------------------------------------------------------------------------


def _column(values: tuple, i: int, default: object) -> object:
    return values[i] if values else default


def _check_columns(batch: SubmitBatch, n: int) -> None:
    """Every per-request column has one entry per request (optional ones may be empty)."""
    for name in ("prompt", "stack", "params", "priority", "deadline_ms", "grammar"):
        values = getattr(batch, name)
        if len(values) != n and (name == "prompt" or values):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name}: {len(values)} entries for {n} requests")


def _check_packed(tokens: np.ndarray, offsets: np.ndarray, limits: Limits) -> list[int]:
    """Checks a packed array (bounds, order, token ids); returns each segment's length."""
    segments = len(offsets) - 1
    if segments < 1 or segments > limits.max_segments:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED if segments > 0 else ErrorCode.BAD_PAYLOAD,
                            f"offsets: {len(offsets)} entries; must be 2..{limits.max_segments + 1} "
                            f"(one more than the segments)")
    if len(tokens) > limits.max_batch_tokens:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                            f"tokens: {len(tokens)} tokens; the limit is {limits.max_batch_tokens}")
    bounds = offsets.astype(np.int64)  # differences of forged int32 offsets could overflow int32
    if bounds[0] != 0 or bounds[-1] != len(tokens):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"offsets must run from 0 to {len(tokens)} (the token "
                            f"count), got {int(bounds[0])} .. {int(bounds[-1])}")
    lengths = bounds[1:] - bounds[:-1]
    if (lengths < 0).any():
        j = int(np.argmax(lengths < 0))
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"offsets must not decrease (offsets[{j + 1}] < "
                            f"offsets[{j}])")
    _check_token_ids(tokens, bounds, limits.vocab_size)
    return lengths.tolist()


def _check_token_ids(tokens: np.ndarray, bounds: np.ndarray, vocab_size: int | None) -> None:
    if not len(tokens):
        return
    # As uint32 a negative id is above every vocabulary: one pass checks both ends.
    if vocab_size is not None and int(tokens.view(np.uint32).max()) < vocab_size:
        return
    bad = tokens < 0 if vocab_size is None else (tokens < 0) | (tokens >= vocab_size)
    if not bad.any():
        return
    position = int(np.argmax(bad))
    segment = int(np.searchsorted(bounds, position, side="right")) - 1
    valid = "ids >= 0" if vocab_size is None else f"the vocabulary [0, {vocab_size})"
    raise ProtocolError(ErrorCode.TOKEN_OUT_OF_RANGE, f"token id {int(tokens[position])} (segment {segment}, "
                        f"position {position - int(bounds[segment])}) is outside {valid}")


def _check_prompts(batch: SubmitBatch, lengths: list[int], limits: Limits) -> None:
    prompt = batch.prompt
    if prompt and max(prompt) < len(lengths):  # the common case, checked in C: every length in range
        chosen = list(map(lengths.__getitem__, prompt))
        if min(chosen) >= 1 and max(chosen) <= limits.max_prompt_tokens:
            return
    for i, segment in enumerate(prompt):  # something fails: find the first request at fault and name it
        if segment >= len(lengths):
            raise _request_error(batch, i, ErrorCode.BAD_FIELD, f"prompt: segment {segment} does not exist "
                                 f"({len(lengths)} segments)")
        if not 1 <= lengths[segment] <= limits.max_prompt_tokens:
            code = ErrorCode.LIMIT_EXCEEDED if lengths[segment] else ErrorCode.BAD_FIELD
            raise _request_error(batch, i, code, f"prompt: segment {segment} has {lengths[segment]} tokens; "
                                 f"must be 1..{limits.max_prompt_tokens}")


def _check_indices(batch: SubmitBatch) -> None:
    _check_index("stack", batch.stack, len(batch.stack_table), "stack_table")
    _check_index("params", batch.params, len(batch.params_table), "params_table")
    _check_index("grammar", [g for g in batch.grammar if g != NO_GRAMMAR], len(batch.grammar_table),
                 "grammar_table")


def _check_index(name: str, values, size: int, table: str) -> None:
    if values and max(values) >= size:
        i = next(i for i, v in enumerate(values) if v >= size)
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name}[{i}]: {values[i]} is not an index of {table} "
                            f"({size} entries)")


def _check_unique(request_ids: tuple[str, ...]) -> None:
    if len(set(request_ids)) == len(request_ids):
        return
    seen = set()
    for i, rid in enumerate(request_ids):
        if rid in seen:
            raise ProtocolError(ErrorCode.DUPLICATE_REQUEST, f"request_id[{i}]: {rid!r} appears twice in the "
                                f"batch", request_id=rid)
        seen.add(rid)


def _check_stop_ids(where: str, params: SamplingParams, limits: Limits) -> None:
    vocab = limits.vocab_size
    if vocab is not None and any(t >= vocab for t in params.stop_token_ids):
        raise ProtocolError(ErrorCode.TOKEN_OUT_OF_RANGE, f"{where}.stop_token_ids: ids must lie in "
                            f"[0, {vocab}), got {list(params.stop_token_ids)}")


def _check_chain(batch: SubmitBatch, chain: Chain, n: int, segments: int) -> None:
    if chain.request >= n:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"chains: request {chain.request} does not exist ({n} "
                            f"requests)")
    for k, step in enumerate(chain.steps, 1):
        where = f"chain step {k}"
        for index, size, table in ((step.stack, len(batch.stack_table), "stack_table"),
                                   (step.params, len(batch.params_table), "params_table"),
                                   (step.grammar, len(batch.grammar_table), "grammar_table")):
            if index >= size:
                raise _request_error(batch, chain.request, ErrorCode.BAD_FIELD, f"{where}: {index} is not "
                                     f"an index of {table} ({size} entries)")
        for p, part in enumerate(step.parts):
            if part.segment is not None and part.segment >= segments:
                raise _request_error(batch, chain.request, ErrorCode.BAD_FIELD, f"{where}, part {p}: "
                                     f"segment {part.segment} does not exist ({segments} segments)")
            if part.output_of is not None and part.output_of >= k:
                raise _request_error(batch, chain.request, ErrorCode.BAD_FIELD, f"{where}, part {p}: "
                                     f"output_of {part.output_of} is not an earlier step")


def _request_error(batch: SubmitBatch, i: int, code: ErrorCode, message: str) -> ProtocolError:
    rid = batch.request_id[i]
    return ProtocolError(code, f"request {i} ({rid!r}): {message}", request_id=rid)


# --- the one encode / decode path -------------------------------------------------------------------------

_SCHEMAS: dict[Limits, Schema] = {}
_ARRAY_FIELDS = {cls: array_fields(cls) for cls in MESSAGES.values()}


def encode(msg: Message) -> tuple[dict, list[np.ndarray]]:
    """The metadata map of a message (without the transport's "arrays" / "shm" keys) and its arrays."""
    arrays = [np.ascontiguousarray(getattr(msg, name), dtype="<i4") for name in _ARRAY_FIELDS[type(msg)]]
    return to_wire(msg), arrays


def decode(msg_type: int, body: dict, arrays: list[np.ndarray], limits: Limits) -> Message:
    """The message of this type from its metadata map and arrays, every field checked (ProtocolError)."""
    cls = MESSAGES.get(msg_type)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type 0x{msg_type:02x}")
    names = _ARRAY_FIELDS[cls]
    if len(arrays) != len(names):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{cls.__name__} carries {len(names)} arrays, got "
                            f"{len(arrays)}")
    for name, array in zip(names, arrays):
        if array.dtype != np.dtype("<i4") or array.ndim != 1:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{name}: expected a 1-d <i4 array, got "
                                f"{array.ndim}-d {array.dtype.str}")
    try:
        msg = _schema(limits).decode(cls, body, dict(zip(names, arrays)))
    except FieldError as e:
        raise ProtocolError(e.code, e.render()) from None
    check = getattr(msg, "check", None)
    if check is not None:
        check(limits)
    return msg


def _schema(limits: Limits) -> Schema:
    schema = _SCHEMAS.get(limits)
    if schema is None:
        if len(_SCHEMAS) >= 64:  # limits come from configs: a handful per process
            _SCHEMAS.clear()
        schema = _SCHEMAS[limits] = Schema(limits, _FOREIGN_RULES)
    return schema


def pack_meta(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True, default=_numpy_scalar)


def _numpy_scalar(value: object) -> object:
    if isinstance(value, np.generic):  # e.g. a token id taken from an array
        return value.item()
    raise TypeError(f"no wire form for {type(value).__name__}")


def unpack_meta(data: bytes | memoryview) -> dict:
    """The metadata frame as a map; anything that is not one msgpack map is BAD_METADATA."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except Exception as e:  # the parser's whole zoo: ExtraData, FormatError, StackError, UnicodeError, ...
        raise ProtocolError(ErrorCode.BAD_METADATA, f"metadata is not valid msgpack: "
                            f"{type(e).__name__}: {e}") from None
    if type(body) is not dict:
        raise ProtocolError(ErrorCode.BAD_METADATA, f"metadata must be a msgpack map, got {kind(body)}")
    return body


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not used by this protocol")


# --- building batches -------------------------------------------------------------------------------------


class _Table:
    """Distinct values in first-seen order (adapter stacks, sampling settings, grammars)."""

    def __init__(self, initial: tuple = ()):
        self.values: list = []
        self._by_id: dict[int, int] = {}  # ids of stored values only: they stay alive, so ids stay unique
        self._by_value: dict[object, int] = {}
        for value in initial:
            self.index(value)

    def index(self, value: object) -> int:
        i = self._by_id.get(id(value))  # the common case: callers share one settings object per tier
        if i is None:
            i = self._by_value.get(value)
        if i is None:
            i = self._by_value[value] = self._by_id[id(value)] = len(self.values)
            self.values.append(value)
        return i


class BatchBuilder:
    """Packs requests into one SubmitBatch: every token segment into one int32 array plus offsets, the
    per-request fields into columns, shared stacks / settings / grammars into tables.

        builder = BatchBuilder()
        builder.add("npc-7:turn-3", prompt_ids, adapters=("vampire.dialogue_style",), params=params)
        extra = builder.segment(instruction_ids)     # a segment for a chain step's parts
        batch = builder.build()
    """

    _DEFAULT_PARAMS = SamplingParams()

    def __init__(self):
        self._segments: list[np.ndarray] = []  # int32, 1-d
        self._offsets: list[int] = [0]  # where each segment ends, after a leading 0
        self._ids: list[str] = []
        self._prompt: list[int] = []
        self._stack: list[int] = []
        self._params: list[int] = []
        self._priority: list[int] = []
        self._deadline_ms: list[float | None] = []
        self._grammar: list[int] = []
        self._stacks = _Table(((),))
        self._params_table = _Table((self._DEFAULT_PARAMS,))
        self._grammars = _Table()
        self._chains: list[Chain] = []

    def segment(self, tokens) -> int:
        """Adds a token segment; returns its index (for a chain step's Part(segment=...))."""
        self._segments.append(int32_tokens(tokens))
        self._offsets.append(self._offsets[-1] + len(self._segments[-1]))
        return len(self._segments) - 1

    def add(self, request_id: str, prompt, adapters: tuple[str, ...] = (),
            params: SamplingParams | None = None, priority: int = 0, deadline_ms: float | None = None,
            grammar: Grammar | None = None, chain: tuple[Step, ...] = ()) -> int:
        """Adds a request (its prompt becomes a new segment); returns its index in the batch."""
        i = len(self._ids)
        self._ids.append(request_id)
        self._prompt.append(self.segment(prompt))
        self._stack.append(self._stacks.index(adapters if type(adapters) is tuple else tuple(adapters)))
        self._params.append(0 if params is None else self._params_table.index(params))
        self._priority.append(priority)
        self._deadline_ms.append(deadline_ms)
        self._grammar.append(NO_GRAMMAR if grammar is None else self._grammars.index(grammar))
        if chain:
            self._chains.append(Chain(i, tuple(self._chain_step(s) for s in chain)))
        return i

    def add_request(self, request: Request, grammar: Grammar | None = None,
                    chain: tuple[Step, ...] = ()) -> int:
        """Adds an engine Request (it must carry a request_id)."""
        if request.request_id is None:
            raise ValueError("a request sent over the wire needs a request_id")
        return self.add(request.request_id, request.prompt, tuple(request.adapters), request.params,
                        request.priority, request.deadline_ms, grammar, chain)

    def _chain_step(self, step: Step) -> ChainStep:
        grammar = NO_GRAMMAR if step.grammar is None else self._grammars.index(step.grammar)
        return ChainStep(step.parts, self._stacks.index(tuple(step.adapters)),
                         self._params_table.index(step.params), grammar)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    @property
    def num_segments(self) -> int:
        return len(self._segments)

    def build(self, tokens_out: np.ndarray | None = None) -> SubmitBatch:
        """The batch; tokens_out (int32 [num_tokens]), when given, receives the packed tokens and becomes
        the batch's token array (a view of a reserved ring slot: no copy on the way to shared memory)."""
        if tokens_out is None:
            tokens_out = np.empty(self.num_tokens, dtype=np.int32)
        if self._segments:
            np.concatenate(self._segments, out=tokens_out)
        offsets = np.array(self._offsets, dtype=np.int32)
        # A column whose entries all take the default is sent empty.
        return SubmitBatch(
            tuple(self._ids), tuple(self._prompt), tokens_out, offsets,
            stack=tuple(self._stack) if any(self._stack) else (),
            params=tuple(self._params) if any(self._params) else (),
            priority=tuple(self._priority) if any(self._priority) else (),
            deadline_ms=tuple(self._deadline_ms) if self._deadline_ms.count(None) != len(self._ids) else (),
            grammar=tuple(self._grammar) if self._grammar.count(NO_GRAMMAR) != len(self._grammar) else (),
            stack_table=tuple(self._stacks.values), params_table=tuple(self._params_table.values),
            grammar_table=tuple(self._grammars.values), chains=tuple(self._chains))


def int32_tokens(tokens) -> np.ndarray:
    """Token ids as a 1-d int32 array (the same array when it already is one); ValueError for an id that
    int32 cannot hold (a cast would wrap it around silently)."""
    array = np.asarray(tokens)
    if array.dtype != np.int32:
        converted = array.astype(np.int32)
        if not np.array_equal(converted, array):
            raise ValueError("token ids must be integers that fit in int32")
        array = converted
    return array if array.ndim == 1 else array.reshape(-1)


def pack_segments(segments) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of a list of token sequences, as SubmitBatch and WarmPrefix carry them."""
    arrays = [int32_tokens(s) for s in segments]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int32)), offsets


def warm_prefix(prefixes: list[tuple[object, tuple[str, ...]]]) -> WarmPrefix:
    """A WarmPrefix of (tokens, adapter stack) pairs."""
    stacks = _Table(((),))
    stack = tuple(stacks.index(tuple(adapters)) for _, adapters in prefixes)
    tokens, offsets = pack_segments([t for t, _ in prefixes])
    return WarmPrefix(tokens, offsets, () if not any(stack) else stack, tuple(stacks.values))
