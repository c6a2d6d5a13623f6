"""The game engine's Python client of the scheduler: asyncio (AsyncGameClient) and blocking (GameClient).

In process: both clients here call a SchedulerServer in the caller's process (tests, tools, a game server
written in Python that hosts the scheduler itself). AsyncGameClient wraps one on the caller's event loop;
GameClient runs one on an event loop in a background thread, built there by the caller's async factory (its
Redis and worker clients must live on that loop). Over the network, plugin_bindings/remote.py has the same
methods (AsyncRemoteGameClient / RemoteGameClient) speaking ipc/GAME_PROTOCOL.md to `npc-scheduler serve`.

    async with AsyncGameClient(server) as game:
        game.register_npc("npc-7", "vampire", "nosferatu", position=(0, 0, 0))
        game.update_positions(["npc-7"], np.array([[3.0, 0.0, 0.0]]))
        await game.tick({"player-1": (0.0, 0.0, 0.0)})
        async for item in game.talk("npc-7", "player-1", "Good evening."):
            ...                                            # str chunks, then a TalkResult (emotion, degraded)
        result = await game.act("npc-7", ActContext(world, "A player enters."))
        await game.event("npc-7", "player-1", "gift", text="a silver ring")

    game = GameClient(make_server)                         # make_server: async () -> SchedulerServer
    for item in game.talk("npc-7", "player-1", "Hello"): ...
    game.close()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from plugin_bindings._sync import iterate_on_loop
from tier_scheduler.server import ActContext, ActResult, SchedulerServer, TalkResult


class AsyncGameClient:
    def __init__(self, server: SchedulerServer):
        self.server = server

    async def __aenter__(self) -> AsyncGameClient:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()

    # NPCs and positions (cheap, synchronous on the server's loop)
    def register_npc(self, npc_id: str, archetype: str, subfaction: str | None = None, **kwargs) -> None:
        self.server.register_npc(npc_id, archetype, subfaction, **kwargs)

    def despawn(self, npc_ids: Iterable[str]) -> None:
        self.server.despawn(npc_ids)

    def update_positions(self, npc_ids: Sequence[str], positions: np.ndarray) -> None:
        self.server.update_positions(npc_ids, positions)

    async def tick(self, players: Mapping[str, Sequence[float]]):
        return await self.server.tick(players)

    def set_override(self, npc_id: str, **fields) -> None:
        """forced= a tier (name or Tier) or None, relationship= a score or None; a field left out is kept."""
        self.server.set_override(npc_id, **fields)

    def hordes(self) -> dict[int, tuple[str, tuple[str, ...]]]:
        """{horde_id: (leader_id, member_ids)} as the last tick clustered the zombies."""
        return self.server.hordes()

    # Requests
    def talk(self, npc_id: str, player_id: str, text: str) -> AsyncIterator[str | TalkResult]:
        return self.server.talk(npc_id, player_id, text)

    async def act(self, npc_id: str, context: ActContext | Mapping) -> ActResult:
        return await self.server.act(npc_id, context)

    async def act_horde(self, leader_or_horde_id: str | int, context: ActContext | Mapping
                        ) -> dict[str, ActResult]:
        """One decision of the horde's leader, fanned out: {npc_id: ActResult} for every member."""
        return await self.server.act_horde(leader_or_horde_id, context)

    # Memory: events, cards, sessions
    async def event(self, npc_id: str, player_id: str, kind: str, text: str = "", **fields):
        """A game event (memory.events.GameEvent types: gift, insult, help, life_saved, attack, betrayal,
        quest_* ...): updates the cards, a salient fact and the emotional trajectory."""
        from memory.events import GameEvent

        return await self.server.memory.apply_event(npc_id, player_id, GameEvent(kind, text, **fields))

    async def get_card(self, npc_id: str, player_id: str, card_type: str):
        return await self.server.memory.get_card(npc_id, player_id, card_type)

    async def put_card(self, card) -> None:
        await self.server.memory.put_card(card)

    async def end_session(self, npc_id: str, player_id: str):
        return await self.server.memory.end_session(npc_id, player_id)

    def stats(self) -> dict:
        return self.server.stats()


class GameClient:
    """Blocking facade: every call runs on the client's own event loop thread and waits for it."""

    def __init__(self, make_server: Callable[[], Awaitable[SchedulerServer]], timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="npc-game-client", daemon=True)
        self._thread.start()
        self._client = AsyncGameClient(self._call(make_server()))
        self._call(self._client.__aenter__())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s)

    def _sync(self, fn, *args, **kwargs):
        async def run():
            return fn(*args, **kwargs)

        return self._call(run())

    def register_npc(self, npc_id: str, archetype: str, subfaction: str | None = None, **kwargs) -> None:
        self._sync(self._client.register_npc, npc_id, archetype, subfaction, **kwargs)

    def despawn(self, npc_ids: Iterable[str]) -> None:
        self._sync(self._client.despawn, list(npc_ids))

    def update_positions(self, npc_ids: Sequence[str], positions: np.ndarray) -> None:
        self._sync(self._client.update_positions, list(npc_ids), np.array(positions))

    def tick(self, players: Mapping[str, Sequence[float]]):
        return self._call(self._client.tick(dict(players)))

    def set_override(self, npc_id: str, **fields) -> None:
        self._sync(self._client.set_override, npc_id, **fields)

    def hordes(self) -> dict[int, tuple[str, tuple[str, ...]]]:
        return self._sync(self._client.hordes)

    def talk(self, npc_id: str, player_id: str, text: str) -> Iterator[str | TalkResult]:
        """Yields the chunks as they arrive, then the TalkResult; leaving early aborts the reply."""
        return iterate_on_loop(lambda: self._client.talk(npc_id, player_id, text), self._loop, self.timeout_s,
                               lambda: TimeoutError(f"talk to {npc_id!r}: nothing for {self.timeout_s} s"))

    def act(self, npc_id: str, context: ActContext | Mapping) -> ActResult:
        return self._call(self._client.act(npc_id, context))

    def act_horde(self, leader_or_horde_id: str | int, context: ActContext | Mapping) -> dict[str, ActResult]:
        return self._call(self._client.act_horde(leader_or_horde_id, context))

    def event(self, npc_id: str, player_id: str, kind: str, text: str = "", **fields):
        return self._call(self._client.event(npc_id, player_id, kind, text, **fields))

    def get_card(self, npc_id: str, player_id: str, card_type: str):
        return self._call(self._client.get_card(npc_id, player_id, card_type))

    def put_card(self, card) -> None:
        self._call(self._client.put_card(card))

    def end_session(self, npc_id: str, player_id: str):
        return self._call(self._client.end_session(npc_id, player_id))

    def stats(self) -> dict:
        return self._sync(self._client.stats)

    def close(self, cleanup: Callable[[SchedulerServer], Awaitable] | None = None) -> None:
        """Closes the server, then runs `cleanup(server)` on the client's loop (close there what the factory
        opened: its Redis and worker clients are bound to that loop), then stops the loop."""
        if not self._loop.is_running():
            return
        try:
            self._call(self._client.__aexit__(None, None, None))
            if cleanup is not None:
                self._call(cleanup(self._client.server))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout_s)
            if not self._thread.is_alive():
                self._loop.close()
