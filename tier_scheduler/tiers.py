"""Re-tiering of every NPC of a region each tick, vectorized with numpy (no Python loop over NPCs).

    state = TierState(config, n_npcs)
    update = state.tick(npc_positions, player_positions, forced=quest_tiers, relationship=scores,
                        replying=active_reply_mask)
    update.promoted_gold   # indices that entered Gold: prefetch their cards, warm their prefix
    update.demoted         # indices that moved down a tier

Rules, applied in this order to every NPC at once:
1. distance tier with hysteresis: Gold when nearer than gold_enter_m, or already Gold and not farther than
   gold_exit_m; Silver likewise with the Silver band (a Gold NPC counts as inside it); else Bronze;
2. overrides are floors: a quest flag (`forced`) keeps an NPC at least at that tier, a relationship score
   >= keep_silver_score keeps it at least Silver;
3. a reply in progress is never cut: an NPC with `replying` set is not demoted this tick (it may be
   promoted); its new tier applies once the reply has ended, at a later tick;
4. caps: over gold_cap Gold NPCs, the farthest are demoted to Silver first (quest-forced ones last, replying
   ones never); then over silver_cap the same for Silver -> Bronze (overridden ones last). Only replying NPCs
   can hold a tier past its cap, for as long as their reply lasts (counted in `over_cap`).

The previous tier array is the hysteresis state: an NPC capped out of Gold at 30 m needs to come under
25 m again to return, so a cap at the boundary does not flap either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tier_scheduler.config import SchedulerConfig, Tier

GOLD, SILVER, BRONZE = np.int8(Tier.GOLD), np.int8(Tier.SILVER), np.int8(Tier.BRONZE)
NO_OVERRIDE = -1  # value of `forced` for an NPC without a quest flag


@dataclass(frozen=True)
class TierUpdate:
    tiers: np.ndarray  # int8 [N], Tier values
    distance_m: np.ndarray  # float32 [N], to the nearest player (inf without players)
    promoted_gold: np.ndarray  # int64 [k] indices that entered Gold this tick (prefetch cards, warm prefix)
    promoted: np.ndarray  # int64 indices that moved up a tier or two (Gold entries included)
    demoted: np.ndarray  # int64 indices that moved down
    held: np.ndarray  # int64 indices whose demotion waits for their reply in progress to end
    over_cap: tuple[int, int]  # (Gold, Silver) NPCs above their cap, held there by replies in progress

    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.tiers, minlength=3)
        return {tier.name.lower(): int(counts[tier]) for tier in Tier}


# -------------------------------------------------------------------------------------------- distance


def nearest_player_distance(npc_positions: np.ndarray, player_positions: np.ndarray,
                            chunk: int = 4096) -> np.ndarray:
    """Meters from each NPC to its nearest player: float32 [N]; inf for every NPC when there is no player.

    npc_positions: [N, D], player_positions: [P, D], D in (2, 3), finite. Uses |a - b|^2 = |a|^2 - 2 a.b +
    |b|^2 with the last two terms as ONE matrix product per chunk of NPCs: [P, D+1] @ [D+1, rows], reduced
    over players along axis 0 (contiguous rows: a min over the short axis 1 is 10x slower), |a|^2 added
    after the min. In float64 and centred on the players' mean: in float32 the expansion would lose
    ~|a|^2 * 6e-8 m^2 (0.25 m at 25 m for coordinates near 10 km).
    """
    npcs, players = _check_positions(npc_positions, player_positions)
    if len(players) == 0:
        return np.full(len(npcs), np.inf, dtype=np.float32)
    dims = npcs.shape[1]
    origin = players.mean(axis=0)
    players = players - origin
    lhs = np.empty((len(players), dims + 1))  # [P, D+1]: -2 b, |b|^2
    lhs[:, :dims] = -2.0 * players
    lhs[:, dims] = (players * players).sum(axis=1)
    out = np.empty(len(npcs), dtype=np.float32)
    for start in range(0, len(npcs), chunk):
        block = npcs[start:start + chunk]
        rhs = np.empty((dims + 1, len(block)))  # [D+1, rows]: a (centred), 1
        np.subtract(block.T, origin[:, None], out=rhs[:dims])
        rhs[dims] = 1.0
        nearest = (lhs @ rhs).min(axis=0) + (rhs[:dims] * rhs[:dims]).sum(axis=0)
        out[start:start + chunk] = np.sqrt(np.maximum(nearest, 0.0))  # rounding can give tiny negatives
    return out


def _check_positions(npcs: np.ndarray, players: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    npcs = np.asarray(npcs, dtype=np.float64)
    players = np.asarray(players, dtype=np.float64)
    if npcs.ndim != 2 or npcs.shape[1] not in (2, 3):
        raise ValueError(f"npc_positions: expected shape [N, 2] or [N, 3], got {list(npcs.shape)}")
    if players.ndim != 2 or players.shape[1] != npcs.shape[1]:
        raise ValueError(f"player_positions: expected shape [P, {npcs.shape[1]}] (the NPCs' dimension), "
                         f"got {list(players.shape)}")
    if not (np.isfinite(npcs).all() and np.isfinite(players).all()):
        raise ValueError("positions: NaN or infinite coordinates (the game sent a bad position)")
    return npcs, players


# ----------------------------------------------------------------------------------------------- rules


def distance_tiers(prev: np.ndarray, distance_m: np.ndarray, config: SchedulerConfig) -> np.ndarray:
    """Rule 1: the tier each NPC's distance gives, with hysteresis on its previous tier. int8 [N]."""
    gold = (distance_m < config.gold_enter_m) | ((prev == GOLD) & (distance_m <= config.gold_exit_m))
    silver = (distance_m < config.silver_enter_m) | ((prev <= SILVER) & (distance_m <= config.silver_exit_m))
    return np.where(gold, GOLD, np.where(silver, SILVER, BRONZE)).astype(np.int8)


def override_floor(n: int, forced: np.ndarray | None, relationship: np.ndarray | None,
                   config: SchedulerConfig) -> np.ndarray:
    """Rule 2: the worst tier each NPC may have (BRONZE where nothing holds it up). int8 [N]."""
    floor = np.full(n, BRONZE, dtype=np.int8)
    if forced is not None:
        forced = _check_array(forced, n, "forced")
        if ((forced != NO_OVERRIDE) & ((forced < GOLD) | (forced > BRONZE))).any():
            raise ValueError("forced: values must be -1 (no override) or a Tier (0 Gold, 1 Silver, 2 Bronze)")
        floor = np.where(forced == NO_OVERRIDE, floor, np.minimum(floor, forced)).astype(np.int8)
    if relationship is not None:
        liked = _check_array(relationship, n, "relationship") >= config.keep_silver_score
        floor[liked] = np.minimum(floor[liked], SILVER)
    return floor


def apply_cap(tiers: np.ndarray, tier: np.int8, cap: int, distance_m: np.ndarray, protected: np.ndarray,
              exempt: np.ndarray) -> int:
    """Rule 4 for one tier, in place: demotes the farthest NPCs of `tier` by one tier until `cap` remain.
    `protected` ones go last; `exempt` ones (replying, already at this tier) never. Returns how many
    exempt NPCs still hold the tier above its cap."""
    members = np.flatnonzero(tiers == tier)
    if len(members) <= cap:
        return 0
    exempt_members = members[exempt[members]]
    candidates = members[~exempt[members]]
    keep = max(cap - len(exempt_members), 0)
    # Keep order: protected first, then nearest; lexsort is stable, so equal distances keep the lower index.
    order = np.lexsort((distance_m[candidates], ~protected[candidates]))
    tiers[candidates[order[keep:]]] = tier + 1
    return max(len(exempt_members) - cap, 0)


def retier(prev: np.ndarray, distance_m: np.ndarray, config: SchedulerConfig, *,
           forced: np.ndarray | None = None, relationship: np.ndarray | None = None,
           replying: np.ndarray | None = None) -> TierUpdate:
    """One tick of rules 1-4 (see the module doc). prev: int8 [N] tiers of the previous tick;
    distance_m: [N] meters to the nearest player; forced: int [N] quest floor tier or -1; relationship:
    [N] relationship score (e.g. max of trust and affinity on the card); replying: bool [N]."""
    prev = _check_array(prev, len(distance_m), "prev").astype(np.int8, copy=False)
    n = len(prev)
    replying = np.zeros(n, bool) if replying is None else _check_array(replying, n, "replying").astype(bool)
    floor = override_floor(n, forced, relationship, config)
    wanted = np.minimum(distance_tiers(prev, distance_m, config), floor)
    held = replying & (wanted > prev)
    tiers = np.where(held, prev, wanted).astype(np.int8)
    forced_gold = floor == GOLD
    over_gold = apply_cap(tiers, GOLD, config.gold_cap, distance_m, forced_gold, replying & (prev == GOLD))
    over_silver = apply_cap(tiers, SILVER, config.silver_cap, distance_m, floor <= SILVER,
                            replying & (prev <= SILVER))
    return TierUpdate(tiers=tiers, distance_m=np.asarray(distance_m, dtype=np.float32),
                      promoted_gold=np.flatnonzero((tiers == GOLD) & (prev != GOLD)),
                      promoted=np.flatnonzero(tiers < prev), demoted=np.flatnonzero(tiers > prev),
                      held=np.flatnonzero(held), over_cap=(over_gold, over_silver))


def _check_array(values: np.ndarray, n: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValueError(f"{name}: expected shape [{n}] (one per NPC), got {list(values.shape)}")
    return values


# ----------------------------------------------------------------------------------------------- state


class TierState:
    """The tier array of a region between ticks (Bronze at start). The caller keeps NPC index -> id and
    resizes with `resize` when NPCs are registered or despawned (new NPCs start Bronze)."""

    def __init__(self, config: SchedulerConfig, n: int = 0):
        self.config = config
        self.tiers = np.full(n, BRONZE, dtype=np.int8)

    def resize(self, keep: np.ndarray | None, added: int = 0) -> None:
        """Keeps the NPCs at indices `keep` (in that order; None: all) and appends `added` Bronze ones."""
        kept = self.tiers if keep is None else self.tiers[np.asarray(keep, dtype=np.int64)]
        self.tiers = np.concatenate([kept, np.full(added, BRONZE, dtype=np.int8)])

    def tick(self, npc_positions: np.ndarray, player_positions: np.ndarray, *,
             forced: np.ndarray | None = None, relationship: np.ndarray | None = None,
             replying: np.ndarray | None = None) -> TierUpdate:
        if len(npc_positions) != len(self.tiers):
            raise ValueError(f"npc_positions: {len(npc_positions)} rows for {len(self.tiers)} NPCs "
                             "(resize the state when NPCs come and go)")
        distance = nearest_player_distance(npc_positions, player_positions, self.config.distance_chunk)
        update = retier(self.tiers, distance, self.config, forced=forced, relationship=relationship,
                        replying=replying)
        self.tiers = update.tiers
        return update
