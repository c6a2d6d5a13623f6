"""Adapter stack degradation: a turn never fails because an adapter is missing; it runs on less, and says so.

    choice = choose_stack(["vampire.dialogue_style", "vampire.sub.nosferatu", "npc.mirela"],
                          Availability(resident={...}, registered={...}, failed={...}))
    choice.adapters    # the stack to send, base first
    choice.degraded    # True when it is not the stack wanted; choice.reason says why

The wanted stack is what gpu_worker.lora.registry.resolve_stack returns: [archetype task adapter,
subfaction delta, NPC delta], deltas optional. When any adapter of it is unavailable, drop the NPC delta;
if still unavailable, drop the subfaction delta too; then run on the base model alone. A delta is never
kept without the layers it was trained on top of (no [task, NPC delta] without the subfaction delta).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StackChoice:
    adapters: tuple[str, ...]  # base first; () is the base model alone
    wanted: tuple[str, ...]
    dropped: tuple[str, ...]  # in the wanted order
    degraded: bool
    reason: str  # "" when not degraded; else which adapters were dropped and why


@dataclass(frozen=True)
class Availability:
    """The predicate from the worker's and the registry's state. By default only resident adapters
    (in a worker slot or its host tier: a swap < 5 ms) count: a registered one would be loaded from disk on
    the hot path, so its turn degrades while the caller asks the worker to load it in the background."""

    resident: Collection[str] = frozenset()
    registered: Collection[str] = frozenset()
    failed: Collection[str] = frozenset()  # load failed (bad file, shape mismatch): never used
    allow_disk_load: bool = False  # True: a registered adapter counts (the request may wait for its load)

    def __call__(self, name: str) -> bool:
        return not self.why(name)

    def why(self, name: str) -> str:
        """"" when available; else the reason."""
        if name in self.failed:
            return "failed to load"
        if name in self.resident:
            return ""
        if name not in self.registered:
            return "missing from the registry"
        return "" if self.allow_disk_load else "not resident yet"


def adapter_names(stack: Sequence) -> tuple[str, ...]:
    """Names of a stack given as names or as registry AdapterRecords (anything with `.name`)."""
    return tuple(item if isinstance(item, str) else item.name for item in stack)


def kind_of(name: str) -> str:
    """"npc", "subfaction" or "task", from the registry's naming (npc.<id>[.<task>],
    <archetype>.sub.<subfaction>[.<task>], <archetype>.<task>)."""
    parts = name.split(".")
    if parts[0] == "npc":
        return "npc"
    return "subfaction" if len(parts) >= 3 and parts[1] == "sub" else "task"


def degradation_steps(wanted: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The stacks to try, best first: the full stack, without the NPC delta, without the subfaction delta
    too, the base model alone (steps that would not change the stack are skipped)."""
    steps = [wanted]
    for kind in ("npc", "subfaction"):
        if any(kind_of(name) == kind for name in steps[-1]):
            steps.append(tuple(name for name in steps[-1] if kind_of(name) != kind))
    if steps[-1]:
        steps.append(())
    return steps


def choose_stack(wanted: Sequence, available: Callable[[str], bool]) -> StackChoice:
    """The best stack whose adapters are all available (see the module doc). `available` is any predicate;
    one with a `why(name)` method (Availability) gives the reasons."""
    wanted = adapter_names(wanted)
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"wanted: duplicate adapters in {list(wanted)}")
    missing = [name for name in wanted if not available(name)]
    if not missing:
        return StackChoice(wanted, wanted, (), False, "")
    stack = next(s for s in degradation_steps(wanted) if not set(s) & set(missing))  # () always qualifies
    dropped = tuple(name for name in wanted if name not in stack)
    why = getattr(available, "why", lambda name: "unavailable")
    cause = "; ".join(f"{name} {why(name)}" for name in missing)
    result = "base model alone" if not stack else "kept " + ", ".join(stack)
    return StackChoice(stack, wanted, dropped, True, f"{cause}: dropped {', '.join(dropped)} ({result})")
