"""Zombie hordes: grid clustering, one leader per horde, and fan-out of the leader's action to its members.

    hordes = cluster_hordes(zombie_positions, cell_m=8.0, min_size=3)    # vectorized binning
    for horde in hordes.hordes:
        decision = ...  # one action_policy request for npc_ids[horde.leader], validated
        actions = fan_out(horde, decision, npc_ids, world, seed=seed, tick=tick)

Clustering: each zombie falls in the grid cell floor(position / cell_m) (all given axes: pass [N, 2] ground
coordinates to ignore height, [N, 3] to keep floors apart). Occupied cells that touch, diagonals included,
merge into one horde (connected components); a group smaller than `min_size` is no horde (its zombies act
alone, label -1). The leader is the member closest to the horde's centroid, the lowest index on ties: the
same positions always give the same hordes, ids and leaders (ids in order of each horde's first cell).

Fan-out: every member takes the leader's action, aimed at a point spread around the target (or around the
leader for moves) so a horde does not stack on one spot; a `variant_rate` share takes a variant instead
(attack -> lunge or groan...); a member that cannot do it (the target out of its range, a state that
forbids it) follows the horde towards the target. Every action returned passed `validate_action` (else it
is the member's safe default). Deterministic given (seed, tick, leader id).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tier_scheduler.actions import Action, Entity, safe_default, validate_action

VARIANTS: dict[str, tuple[str, ...]] = {
    "attack": ("lunge", "groan"),
    "lunge": ("attack", "groan"),
    "feed": ("groan",),
    "follow_horde": ("groan", "wander"),
    "wander": ("groan", "idle"),
    "groan": ("wander",),
    "idle": ("groan",),
}
_MAX_KEY = 1 << 62  # cell keys are int64: the grid's mixed-radix span must stay below this


@dataclass(frozen=True)
class Horde:
    horde_id: int
    leader: int  # index into the positions given to cluster_hordes
    members: np.ndarray  # int64 [M] indices, ascending, the leader included
    centroid: np.ndarray  # float64 [D], meters


@dataclass(frozen=True)
class Hordes:
    labels: np.ndarray  # int32 [N]: horde id of each zombie, -1 for one that acts alone
    hordes: list[Horde]


# ------------------------------------------------------------------------------------------ clustering


def cluster_hordes(positions: np.ndarray, cell_m: float = 8.0, min_size: int = 3) -> Hordes:
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] not in (2, 3) or not np.isfinite(positions).all():
        raise ValueError(f"positions: expected finite [N, 2] or [N, 3], got shape {list(positions.shape)}")
    if not cell_m > 0 or min_size < 1:
        raise ValueError(f"cell_m must be > 0 and min_size >= 1, got {cell_m!r} and {min_size!r}")
    n = len(positions)
    if n == 0:
        return Hordes(np.empty(0, np.int32), [])
    cell_keys, weights = _cell_keys(np.floor(positions / cell_m).astype(np.int64))
    cells, cell_of = np.unique(cell_keys, return_inverse=True)  # cells: sorted keys [C]; cell_of: [N]
    component = _components(len(cells), *_touching(cells, weights))[cell_of]  # [N], smallest cell index
    return _hordes(positions, component, min_size)


def _cell_keys(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One int64 per cell (mixed radix, first axis most significant) such that a neighbour's key is the key
    plus offset @ weights: coordinates are shifted so that -1 and +1 neighbours stay inside the radix."""
    shifted = cells - cells.min(axis=0) + 1
    radix = shifted.max(axis=0) + 2
    if np.prod(radix.astype(np.float64)) >= _MAX_KEY:
        raise ValueError("positions: the grid spans too many cells for int64 keys; raise cell_m")
    weights = np.concatenate([np.cumprod(radix[::-1])[::-1][1:], [1]]).astype(np.int64)
    return shifted @ weights, weights


def _touching(cells: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i, j) between occupied cells that touch: half of the 3^D - 1 neighbour offsets (the
    lexicographically positive ones), each looked up by binary search in the sorted keys."""
    firsts, seconds = [], []
    for offset in itertools.product((-1, 0, 1), repeat=len(weights)):
        if offset <= (0,) * len(weights):
            continue
        wanted = cells + int(np.dot(offset, weights))
        found = np.minimum(np.searchsorted(cells, wanted), len(cells) - 1)
        hit = cells[found] == wanted
        firsts.append(np.flatnonzero(hit))
        seconds.append(found[hit])
    return np.concatenate(firsts), np.concatenate(seconds)


def _components(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Connected components of n nodes: each node's label is the smallest node of its component. Hooks
    the larger root of every edge under the smaller, then pointer-jumps to the roots, until no edge joins
    two labels (a few rounds: log of the horde's diameter in cells)."""
    labels = np.arange(n)
    while True:
        low = np.minimum(labels[first], labels[second])
        hooked = labels.copy()
        np.minimum.at(hooked, labels[first], low)
        np.minimum.at(hooked, labels[second], low)
        while not np.array_equal(jumped := hooked[hooked], hooked):
            hooked = jumped
        if np.array_equal(hooked, labels):
            return labels
        labels = hooked


def _hordes(positions: np.ndarray, component: np.ndarray, min_size: int) -> Hordes:
    _, group_of, sizes = np.unique(component, return_inverse=True, return_counts=True)
    is_horde = sizes >= min_size
    labels = np.where(is_horde, np.cumsum(is_horde) - 1, -1).astype(np.int32)[group_of]
    n_hordes = int(is_horde.sum())
    inside = np.flatnonzero(labels >= 0)  # ascending
    if n_hordes == 0:
        return Hordes(labels, [])
    label = labels[inside]
    counts = np.bincount(label, minlength=n_hordes)
    centroids = np.stack([np.bincount(label, positions[inside, d], n_hordes)
                          for d in range(positions.shape[1])], axis=1) / counts[:, None]
    spread = ((positions[inside] - centroids[label]) ** 2).sum(axis=1)  # m^2 to the own centroid
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # Both orders group the members by horde (same counts): by index, and by (distance, index) for leaders.
    members = np.split(inside[np.argsort(label, kind="stable")], starts[1:])
    leaders = inside[np.lexsort((inside, spread, label))][starts]
    hordes = [Horde(h, int(leaders[h]), members[h], centroids[h]) for h in range(n_hordes)]
    return Hordes(labels, hordes)


# ------------------------------------------------------------------------------------------- fan-out


def fan_out(horde: Horde, leader_action: Action, npc_ids: Sequence[str], world: Mapping[str, Entity], *,
            seed: int = 0, tick: int = 0, spread_m: float = 1.5, variant_rate: float = 0.15,
            ground_axes: tuple[int, ...] = (0, 1)) -> list[Action]:
    """One action per member of `horde` (in members order) from the leader's decision; see the module doc.
    npc_ids: id of each index given to cluster_hordes. world: the game state, with each member's horde_id
    set. ground_axes: the axes that the spread offsets move along (Unity-style y-up positions: (0, 2))."""
    if not 0 <= variant_rate <= 1 or spread_m < 0:
        raise ValueError(f"variant_rate must be in [0, 1] and spread_m >= 0, got {variant_rate!r}, "
                         f"{spread_m!r}")
    leader_id = npc_ids[horde.leader]
    rng = np.random.default_rng([seed & 0xFFFFFFFF, tick & 0xFFFFFFFF, zlib.crc32(leader_id.encode())])
    dims = len(world[leader_id].position)
    members = len(horde.members)
    offsets = np.zeros((members, dims))  # meters
    offsets[:, list(ground_axes)] = rng.uniform(-spread_m, spread_m, size=(members, len(ground_axes)))
    variant = rng.random(len(horde.members)) < variant_rate
    picks = rng.integers(0, 1 << 30, size=len(horde.members))
    anchor = leader_action.position or world[leader_id].position
    out = []
    for k, member in enumerate(horde.members):
        member_id = npc_ids[member]
        name = leader_action.name
        if member_id != leader_id and variant[k] and VARIANTS.get(name):
            name = VARIANTS[name][picks[k] % len(VARIANTS[name])]
        offset = tuple(offsets[k]) if member_id != leader_id else (0.0,) * dims
        out.append(_member_action(member_id, name, leader_action, anchor, offset, world))
    return out


def _member_action(member_id: str, name: str, leader_action: Action, anchor: tuple[float, ...],
                   offset: tuple[float, ...], world: Mapping[str, Entity]) -> Action:
    """The member's version of the horde's action: validated; else following the horde towards the
    anchor; else its safe default."""
    target = leader_action.target or "none"
    for candidate in ({"action": name, "target": target}, {"action": "follow_horde", "target": "none"}):
        verdict = validate_action(member_id, candidate, world)
        if verdict.ok:
            return _placed(verdict.action, anchor, offset)
    return safe_default(member_id, world)


def _placed(action: Action, anchor: tuple[float, ...], offset: tuple[float, ...]) -> Action:
    """Where the member goes: around its target, or around the horde's anchor for moves; none for emotes."""
    if action.position is not None:
        base = action.position
    elif action.name in ("follow_horde", "wander"):
        base = anchor
    else:
        return action
    position = tuple(float(b + o) for b, o in zip(base, offset))
    return Action(action.npc_id, action.name, action.target, position)
