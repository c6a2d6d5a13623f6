"""Horde clustering (grid cells, touching cells merge, against a breadth-first oracle), leaders, and fan-out
of the leader's action: every member gets a valid action, with variation, deterministically."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tier_scheduler.actions import Action, Entity, validate_action
from tier_scheduler.hordes import VARIANTS, cluster_hordes, fan_out


def oracle_partition(positions, cell_m, min_size):
    """Groups of indices (sets) by breadth-first search over touching occupied cells."""
    cells = {}
    for i, p in enumerate(positions):
        cells.setdefault(tuple(int(math.floor(x / cell_m)) for x in p), []).append(i)
    seen, groups = set(), []
    for start in cells:
        if start in seen:
            continue
        seen.add(start)
        queue, members = [start], []
        while queue:
            cell = queue.pop()
            members += cells[cell]
            for offset in itertools.product((-1, 0, 1), repeat=len(cell)):
                other = tuple(c + o for c, o in zip(cell, offset))
                if other in cells and other not in seen:
                    seen.add(other)
                    queue.append(other)
        if len(members) >= min_size:
            groups.append(frozenset(members))
    return set(groups)


def partition(hordes):
    return {frozenset(h.members.tolist()) for h in hordes.hordes}


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 150), dims=st.sampled_from([2, 3]),
       cell_m=st.sampled_from([2.0, 5.0, 8.0]), min_size=st.integers(1, 4))
def test_clustering_matches_the_oracle(seed, n, dims, cell_m, min_size):
    rng = np.random.default_rng(seed)
    positions = rng.uniform(-60, 60, (n, dims))
    hordes = cluster_hordes(positions, cell_m, min_size)
    assert partition(hordes) == oracle_partition(positions, cell_m, min_size)
    for horde in hordes.hordes:
        assert (hordes.labels[horde.members] == horde.horde_id).all()
        assert horde.leader in horde.members
        spread = ((positions[horde.members] - horde.centroid) ** 2).sum(axis=1)
        np.testing.assert_allclose(horde.centroid, positions[horde.members].mean(axis=0))
        nearest = horde.members[spread == spread.min()]
        assert horde.leader == nearest.min()  # closest to the centroid, lowest index on ties
    assert (hordes.labels == -1).sum() == n - sum(len(h.members) for h in hordes.hordes)


def test_touching_cells_merge_diagonally_and_transitively():
    cell = 8.0
    chain = np.array([[1.0, 1.0], [9.0, 9.0], [17.0, 17.0], [100.0, 100.0], [101.0, 101.0], [300.0, 0.0]])
    hordes = cluster_hordes(chain, cell, min_size=2)
    assert partition(hordes) == {frozenset({0, 1, 2}), frozenset({3, 4})}
    assert hordes.labels.tolist() == [0, 0, 0, 1, 1, -1]
    assert hordes.hordes[0].leader == 1  # the middle one sits on the centroid


def test_clustering_is_deterministic_and_order_independent():
    rng = np.random.default_rng(3)
    positions = np.concatenate([rng.normal(0, 3, (40, 2)), rng.normal(80, 3, (30, 2))])
    first, again = cluster_hordes(positions), cluster_hordes(positions)
    assert [h.leader for h in first.hordes] == [h.leader for h in again.hordes]
    order = rng.permutation(len(positions))
    shuffled = cluster_hordes(positions[order])
    assert {frozenset(order[list(g)].tolist()) for g in partition(shuffled)} == partition(first)


def test_bad_input():
    with pytest.raises(ValueError, match="positions"):
        cluster_hordes(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="cell_m"):
        cluster_hordes(np.zeros((3, 2)), cell_m=0)
    assert cluster_hordes(np.zeros((0, 2))).hordes == []


# ----------------------------------------------------------------------------------------------- fan-out


def horde_world(n=40, seed=0):
    rng = np.random.default_rng(seed)
    positions = rng.uniform(0, 10, (n, 2))
    hordes = cluster_hordes(positions, cell_m=4.0, min_size=3)
    (horde,) = hordes.hordes
    ids = [f"z{i}" for i in range(n)]
    world = {ids[i]: Entity(ids[i], "npc", tuple(positions[i]), archetype="zombie", state="hunting",
                            horde_id=int(hordes.labels[i])) for i in range(n)}
    world["p1"] = Entity("p1", "player", (5.0, 5.0))
    world["body"] = Entity("body", "npc", (5.5, 4.5), alive=False, archetype="vampire")
    return horde, ids, world


@pytest.mark.parametrize("decision", [Action("", "attack", "p1"), Action("", "lunge", "p1"),
                                      Action("", "wander", None, (30.0, 30.0)), Action("", "follow_horde"),
                                      Action("", "feed", "body"), Action("", "groan")])
def test_every_member_gets_a_valid_action(decision):
    horde, ids, world = horde_world()
    leader = ids[horde.leader]
    leader_action = validate_action(leader, {"action": decision.name, "target": decision.target or "none"},
                                    world).action or Action(leader, "follow_horde")
    if decision.position is not None:
        leader_action = Action(leader, decision.name, None, decision.position)
    actions = fan_out(horde, leader_action, ids, world, seed=1, tick=5, variant_rate=0.3)
    assert [a.npc_id for a in actions] == [ids[m] for m in horde.members]
    for action in actions:
        assert validate_action(action.npc_id, {"action": action.name, "target": action.target or "none"},
                               world).ok
    names = {a.name for a in actions}
    assert names <= {leader_action.name, "follow_horde", *VARIANTS.get(leader_action.name, ())}


def test_fan_out_varies_and_is_deterministic():
    horde, ids, world = horde_world()
    leader_action = validate_action(ids[horde.leader], {"action": "lunge", "target": "p1"}, world).action
    actions = fan_out(horde, leader_action, ids, world, seed=7, tick=3, variant_rate=0.3)
    assert fan_out(horde, leader_action, ids, world, seed=7, tick=3, variant_rate=0.3) == actions
    assert fan_out(horde, leader_action, ids, world, seed=8, tick=3, variant_rate=0.3) != actions
    assert fan_out(horde, leader_action, ids, world, seed=7, tick=4, variant_rate=0.3) != actions
    positions = {a.position for a in actions if a.position is not None}
    assert len(positions) > len(actions) // 2  # spread around the target, not one spot
    assert len({a.name for a in actions}) >= 2  # variants present
    by_id = {a.npc_id: a for a in actions}
    assert by_id[ids[horde.leader]] == leader_action  # the leader does exactly what it decided


def test_members_out_of_range_follow_the_horde():
    horde, ids, world = horde_world()
    leader_action = validate_action(ids[horde.leader], {"action": "lunge", "target": "p1"}, world).action
    actions = fan_out(horde, leader_action, ids, world, variant_rate=0.0)
    for action in actions:
        near = math.dist(world[action.npc_id].position, world["p1"].position) <= 6.0
        assert action.name == ("lunge" if near else "follow_horde")
        if action.name == "follow_horde":
            assert math.dist(action.position, world["p1"].position) <= 1.5 * math.sqrt(2) + 1e-9
