"""The tier scheduler's policy: plain Python/numpy, no model or worker needed (STYLE habit 2).

What the process wiring calls (one SchedulerConfig, composed once at launch):

- tiers.TierState(config, n).tick(npc_positions, player_positions, forced=, relationship=, replying=)
  -> TierUpdate (tiers, promoted_gold: prefetch cards + warm prefix, demoted, held, over_cap), each tick;
- queues.RequestQueues(config): push(Request, now) -> outcomes, wait_s(now), next_batch(now) -> Batch
  (requests Gold first + dropped outcomes), cancel, drain; every outcome must become a reply;
- prompts.build_prompt / build_from_context -> Prompt; prompts.PieceTokenizer(tokenizer).encode(prompt);
- adapters.choose_stack(resolved_stack, Availability(...)) -> StackChoice (adapters, degraded, reason);
- actions.action_schema(archetype, targets) for the grammar; actions.action_or_default(npc, decoded, world);
- hordes.cluster_hordes(zombie_positions) and hordes.fan_out(horde, leader_action, ids, world, seed, tick);
- barks.BarkDecks(seed).next(npc_id, archetype, situation) for Bronze NPCs.

Submodules are imported by the caller: importing this package loads nothing (no torch, no redis).
"""
