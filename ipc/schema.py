"""Dataclass <-> msgpack value, driven by field annotations and rules: the machinery under ipc/messages.py.

Wire forms: str, int, float (an int is taken too), bool, `X | None` (nil), `tuple[X, ...]` (an array),
dict (a free map), a dataclass (a map keyed by field name; fields equal to their default may be left out;
unknown keys are refused), np.ndarray (not in the map: the frame layer carries arrays).

A field's rule (`rule(default, lo=..., hi=..., pattern=..., max_items=...)`) bounds it; a bound given as a
string names a Limits field, resolved once when a Schema is built for that Limits. Decoding checks the type
and range of every value and raises FieldError with the path of the bad one (`stack_table[2][0]: ...`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field

import numpy as np

from ipc.errors import ErrorCode

I64_MIN, U64 = -(2**63), 2**64 - 1
_SCALARS = frozenset({str, int, float, bool, type(None)})
_NUMBERS, _INT, _LIST = frozenset({float, int}), {int}, {list}
_DEFAULT_COMPARABLE = frozenset({str, int, float, bool, tuple})  # types whose value is compared to a default
_CACHE_SIZE = 1024  # entries per cache of shared values (a handful are live at a time)


@dataclass(frozen=True)
class Rule:
    lo: float | str | None = None  # numbers: inclusive bounds
    hi: float | str | None = None
    finite: bool = True  # floats: refuse inf and nan
    max_len: int | str = "max_string"  # strings, in code points
    pattern: re.Pattern | None = None  # strings: must match in full
    choices: frozenset[str] | None = None
    max_items: int | str = "max_items"  # arrays (the innermost, for an array of arrays)
    max_rows: int | str = "max_items"  # the outer array of an array of arrays


def rule(default: object = MISSING, **constraints) -> dataclasses.Field:
    """A dataclass field with wire constraints (see Rule)."""
    return field(default=default, metadata={"rule": Rule(**constraints)})


class FieldError(Exception):
    """A value that breaks its field's rule; the path is collected on the way out, innermost first."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_FIELD):
        super().__init__(message)
        self.code, self.path = code, []

    def at(self, part: str) -> FieldError:
        self.path.append(part)
        return self

    def render(self) -> str:
        where = "".join(p if p.startswith("[") else f".{p}" for p in reversed(self.path)).lstrip(".")
        return f"{where}: {self}" if where else str(self)


def kind(value: object) -> str:
    """How a msgpack value reads in an error message."""
    return {dict: "a map", list: "an array", str: "a string", bytes: "binary", bool: "a bool",
            int: "an integer", float: "a float", type(None): "nil"}.get(type(value), type(value).__name__)


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_SHARED: set[type] = set()


def shared_value(cls: type) -> type:
    """Marks a frozen dataclass whose values many messages repeat (sampling settings, grammars): each
    instance is encoded once and each distinct map decoded (and checked) once, per process and Limits."""
    _SHARED.add(cls)
    _ENCODERS.pop(cls, None)
    return cls


def _cache_key(value: dict) -> tuple | None:
    """A hashable key for a map of scalars and arrays of scalars that keeps types apart (1, 1.0 and True
    are equal in Python but not on the wire); None for anything else."""
    try:
        key = tuple((k, type(v), tuple((type(x), x) for x in v) if type(v) is list else v)
                    for k, v in value.items())
        hash(key)
    except TypeError:
        return None
    return key


Check = Callable[[object], object]
# A checker may carry `fast`: values -> tuple | None, checking a whole array in one pass (None: some item
# fails, and the per-item path then names it). Batches are column-wise, so arrays of scalars dominate.


class Schema:
    """Decoders of dataclasses compiled for one Limits (its bounds baked into the checks)."""

    def __init__(self, limits: object, foreign_rules: dict | None = None):
        self.limits = limits
        self.foreign_rules = foreign_rules or {}
        self._records: dict[type, Callable] = {}

    def decode(self, cls: type, value: object, arrays: dict | None = None) -> object:
        """An instance of cls from its wire map (plus its arrays, which travel outside the map)."""
        return self._record(cls)(value, arrays)

    def _limit(self, value: float | str | None) -> float | None:
        return getattr(self.limits, value) if isinstance(value, str) else value

    def _record(self, cls: type) -> Callable:
        record = self._records.get(cls)
        if record is None:
            record = self._records[cls] = self._compile_record(cls)
        return record

    def _compile_record(self, cls: type) -> Callable:
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            if hints[f.name] is np.ndarray:
                continue
            required = f.default is MISSING and f.default_factory is MISSING
            fields.append((f.name, self._converter(hints[f.name], _rule_of(cls, f, self.foreign_rules)),
                           required))
        names = frozenset(name for name, _, _ in fields)
        cache: dict | None = {} if cls in _SHARED else None

        def decode(value, arrays=None):
            if type(value) is not dict:
                raise FieldError(f"expected a map, got {kind(value)}")
            key = _cache_key(value) if cache is not None else None
            if key is not None:
                hit = cache.get(key)
                if hit is not None:
                    return hit
            obj = build(value, arrays)
            if key is not None:
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[key] = obj
            return obj

        def build(value, arrays):
            kwargs, used = {}, 0
            for name, convert, required in fields:
                if name in value:
                    used += 1
                    try:
                        kwargs[name] = convert(value[name])
                    except FieldError as e:
                        raise e.at(name) from None
                elif required:
                    raise FieldError(f"missing key {name!r}")
            if used != len(value):
                raise FieldError(f"unknown key {show(next(k for k in value if k not in names))}")
            try:
                return cls(**kwargs, **(arrays or {}))
            except (ValueError, TypeError) as e:  # the class's own checks (__post_init__)
                raise FieldError(str(e)) from None

        return decode

    def _converter(self, hint: object, r: Rule) -> Check:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            return self._union([a for a in args if a is not type(None)], type(None) in args, r)
        if origin is tuple:
            return self._sequence(args[0], r)
        if dataclasses.is_dataclass(hint):
            return lambda value: self._record(hint)(value)  # compiled on first use: forward references
        if hint is str:
            return self._string(r)
        if hint is int:
            return self._integer(r)
        if hint is float:
            return self._real(r)
        if hint is bool:
            return _boolean
        if hint is dict:
            return _mapping
        raise TypeError(f"no wire form for {hint!r}")

    def _union(self, options: list, nullable: bool, r: Rule) -> Check:
        inner = [self._converter(a, r) for a in options]
        label = " or ".join(getattr(a, "__name__", str(a)) for a in options) + (" or nil" if nullable else "")

        def check(value):
            if value is None and nullable:
                return None
            for convert in inner:
                try:
                    return convert(value)
                except FieldError as e:
                    if len(inner) == 1:
                        raise e from None
            raise FieldError(f"expected {label}, got {kind(value)} {show(value)}")

        inner_fast = getattr(inner[0], "fast", None)
        if len(inner) == 1 and inner_fast is not None:
            check.fast = _nullable_fast(inner_fast) if nullable else inner_fast
        return check

    def _string(self, r: Rule) -> Check:
        max_len, pattern, choices = self._limit(r.max_len), r.pattern, r.choices

        def check(value):
            if type(value) is not str:
                raise FieldError(f"expected a string, got {kind(value)}")
            if len(value) > max_len:
                raise FieldError(f"string of {len(value)} characters; the limit is {max_len}",
                                 ErrorCode.LIMIT_EXCEEDED)
            if pattern is not None and pattern.fullmatch(value) is None:
                raise FieldError(f"{show(value)} does not match {pattern.pattern}")
            if choices is not None and value not in choices:
                raise FieldError(f"{show(value)} is not one of {sorted(choices)}")
            return value

        # Every item at once: joined by a newline (which no pattern here admits), matched by one regex.
        joined_pattern = None if pattern is None else re.compile(
            f"(?:{pattern.pattern})(?:\n(?:{pattern.pattern}))*")

        def fast(values):
            if not values:
                return ()
            try:
                joined = "\n".join(values)
            except TypeError:  # an item that is not a string
                return None
            if len(joined) > max_len and max(map(len, values)) > max_len:  # the total bounds each length
                return None
            if joined_pattern is not None and (joined.count("\n") != len(values) - 1
                                               or joined_pattern.fullmatch(joined) is None):
                return None
            if choices is not None and not choices.issuperset(values):
                return None
            return tuple(values)

        fast.keeps_values = True  # what passes comes back as it was (see _rows_fast)
        check.fast = fast
        return check

    def _integer(self, r: Rule) -> Check:
        lo = I64_MIN if r.lo is None else self._limit(r.lo)
        hi = U64 if r.hi is None else self._limit(r.hi)

        def check(value):
            if type(value) is not int:  # msgpack keeps bool apart from int, and so does this check
                raise FieldError(f"expected an integer, got {kind(value)}")
            if not lo <= value <= hi:
                raise FieldError(f"{value} is outside [{lo}, {hi}]")
            return value

        def fast(values):
            return tuple(values) if _ints_within(values, lo, hi) else None

        fast.keeps_values = True
        check.fast = fast
        return check

    def _real(self, r: Rule) -> Check:
        lo = -math.inf if r.lo is None else self._limit(r.lo)
        hi = math.inf if r.hi is None else self._limit(r.hi)
        finite = r.finite

        def check(value):
            if type(value) is not float and type(value) is not int:
                raise FieldError(f"expected a number, got {kind(value)}")
            value = float(value)
            if finite and not math.isfinite(value):
                raise FieldError(f"must be finite, got {value}")
            if not lo <= value <= hi and not math.isnan(value):
                raise FieldError(f"{value} is outside [{lo}, {hi}]")
            return value

        def fast(values):
            # A finite sum rules out inf and nan (which min and max would pass over); the per-item path
            # decides about anything else, including the odd sum that overflows.
            ok = not values or (set(map(type, values)) <= _NUMBERS and math.isfinite(sum(values))
                                and lo <= min(values) and max(values) <= hi)
            return tuple(map(float, values)) if ok else None

        check.fast = fast
        return check

    def _sequence(self, item_hint: object, r: Rule) -> Check:
        inner_is_array = typing.get_origin(item_hint) is tuple
        item = self._converter(item_hint, r)
        cap = self._limit(r.max_items if not inner_is_array else r.max_rows)
        fast = getattr(item, "fast", None)

        def check(value):
            if type(value) is not list:
                raise FieldError(f"expected an array, got {kind(value)}")
            if len(value) > cap:
                raise FieldError(f"array of {len(value)} items; the limit is {cap}", ErrorCode.LIMIT_EXCEEDED)
            if fast is not None:
                checked = fast(value)
                if checked is not None:
                    return checked
            out = []
            for i, x in enumerate(value):
                try:
                    out.append(item(x))
                except FieldError as e:
                    raise e.at(f"[{i}]") from None
            return tuple(out)

        if fast is not None:
            check.fast = _rows_fast(fast, cap)  # this array as an item of an outer one
        return check


def _ints_within(values: list, lo: int, hi: int) -> bool:
    # set(map(type, ...)) runs in C; bool is a type of its own, so True never passes as 1
    return not values or (set(map(type, values)) == _INT and lo <= min(values) and max(values) <= hi)


def _rows_fast(item_fast: Callable, cap: int) -> Callable:
    """Checks an array of arrays as one flat array (one pass instead of one per row)."""

    def fast(rows):
        if rows and (set(map(type, rows)) != _LIST or max(map(len, rows)) > cap):
            return None
        checked = item_fast(list(itertools.chain.from_iterable(rows)))
        if checked is None:
            return None
        if getattr(item_fast, "keeps_values", False):
            return tuple(map(tuple, rows))
        out, start = [], 0
        for row in rows:
            out.append(checked[start:start + len(row)])
            start += len(row)
        return tuple(out)

    return fast


def _nullable_fast(inner_fast: Callable) -> Callable:
    def fast(values):
        if None not in values:
            return inner_fast(values)
        checked = inner_fast([x for x in values if x is not None])
        if checked is None:
            return None
        present = iter(checked)
        return tuple(None if x is None else next(present) for x in values)

    return fast


def _boolean(value):
    if type(value) is not bool:
        raise FieldError(f"expected a bool, got {kind(value)}")
    return value


def _mapping(value):
    if type(value) is not dict:
        raise FieldError(f"expected a map, got {kind(value)}")
    return value


def _rule_of(cls: type, f: dataclasses.Field, foreign: dict) -> Rule:
    return f.metadata.get("rule") or foreign.get((cls, f.name)) or Rule()


# --- encoding ---------------------------------------------------------------------------------------------


@dataclass
class _Encoder:
    # (name, default, as_is) of every field that goes in the map; as_is: scalars and tuples of scalars,
    # which msgpack packs as they are (a tuple as an array)
    fields: list[tuple[str, object, bool]]
    cache: dict[int, tuple[object, dict]] | None  # id(instance) -> (instance, its map)


_ENCODERS: dict[type, _Encoder] = {}


def array_fields(cls: type) -> list[str]:
    """Names of the np.ndarray fields of a dataclass, in order: its arrays on the wire."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] is np.ndarray]


def _encoder(cls: type) -> _Encoder:
    encoder = _ENCODERS.get(cls)
    if encoder is None:
        hints = typing.get_type_hints(cls)
        fields = [(f.name, f.default, _packs_as_is(hints[f.name])) for f in dataclasses.fields(cls)
                  if hints[f.name] is not np.ndarray]
        encoder = _ENCODERS[cls] = _Encoder(fields, {} if cls in _SHARED else None)
    return encoder


def _packs_as_is(hint: object) -> bool:
    """Whether values of this type are msgpack-ready as they are: scalars, and tuples of them (at any
    depth), which msgpack packs as arrays."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return _packs_as_is(typing.get_args(hint)[0])
    if origin in (types.UnionType, typing.Union):
        return all(_packs_as_is(a) for a in typing.get_args(hint))
    return hint in _SCALARS


def to_wire(value: object) -> object:
    """A value as msgpack takes it: dataclasses as maps (defaults left out), tuples as lists."""
    t = type(value)
    if t in _SCALARS:
        return value
    if t is tuple or t is list:
        return [v if type(v) in _SCALARS else to_wire(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _record_to_wire(value)
    if t is dict:
        return {k if type(k) is str else str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"no wire form for {t.__name__}")


def _record_to_wire(obj: object) -> dict:
    encoder = _encoder(type(obj))
    if encoder.cache is not None:
        hit = encoder.cache.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
    out = {}
    for name, default, as_is in encoder.fields:
        value = getattr(obj, name)
        if value is default or (type(value) is type(default) and type(value) in _DEFAULT_COMPARABLE
                                and value == default):
            continue
        out[name] = value if as_is else to_wire(value)
    if encoder.cache is not None:
        if len(encoder.cache) >= _CACHE_SIZE:
            encoder.cache.clear()
        encoder.cache[id(obj)] = (obj, out)  # holding obj keeps its id from being reused while cached
    return out
