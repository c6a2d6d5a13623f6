"""The game engine's networked client of the scheduler: asyncio (AsyncRemoteGameClient) and blocking
(RemoteGameClient), speaking only the game protocol (ipc/GAME_PROTOCOL.md) to `npc-scheduler serve`.

    async with AsyncRemoteGameClient("ipc:///run/user/1000/npc-ipc/sched.sock") as game:
        await game.register_npc("npc-7", "vampire", "nosferatu", position=(0, 0, 0))
        await game.update_positions(["npc-7"], np.array([[3.0, 0.0, 0.0]]))
        update = await game.tick({"player-1": (0.0, 0.0, 0.0)})      # TickResult (by NPC id)
        async for item in game.talk("npc-7", "player-1", "Good evening."):
            ...                                            # str chunks, then a TalkResult (emotion, degraded)
        result = await game.act("npc-7", ActContext(world, "A player enters."))   # a validated ActResult
        await game.event("npc-7", "player-1", "gift", text="a silver ring")       # EventOutcome
        card = await game.get_card("npc-7", "player-1", "relationship")          # RelationshipCard | None

    game = RemoteGameClient(endpoint)                      # the same methods, blocking
    for item in game.talk("npc-7", "player-1", "Hello"): ...
    game.close()

Method names and results are those of the in-process clients (plugin_bindings/client.py), with two
differences a network imposes: every call of the asyncio client is a coroutine (register_npc, despawn,
update_positions and stats included), and tick returns a TickResult keyed by NPC id instead of a TierUpdate
of row indices. Many requests (talks included) run concurrently over the one socket, matched by corr_id.

Errors: a refusal by the scheduler raises a RemoteGameError subclass naming the problem (its `code` is the
protocol's): UnknownNpcError (also a KeyError), RemoteInvalidRequest (ValueError: bad fields, NaN positions,
duplicate NPCs, unknown archetypes or event types), RemoteCardTooLarge (ValueError), RemoteOverloaded,
RemoteNotSupported (NotImplementedError), RemoteTimeout (TimeoutError: no answer within timeout_s; for a
talk, no chunk within timeout_s). Leaving a talk before its TalkResult (break, aclose, a timeout) sends
CANCEL, so the scheduler stops the reply and frees the NPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from types import EllipsisType

import numpy as np
import zmq
import zmq.asyncio

from plugin_bindings._sync import iterate_on_loop
from tier_scheduler.game_wire import (
    DEFAULT_LIMITS,
    REPLY_BIT,
    SCHEDULER_TO_GAME,
    SUPPORTED_VERSIONS,
    ActContext,
    ActResult,
    Card,
    GameErrorCode,
    GameLimits,
    GameMessage,
    GameMsgType,
    GameProtocolError,
    TalkResult,
    TickResult,
    act_result_from_wire,
    card_from_wire,
    card_to_wire,
    code_name,
    context_to_wire,
    decode,
    encode,
    event_outcome_from_wire,
    hordes_from_wire,
    session_outcome_from_wire,
    talk_result_from_wire,
    tick_from_wire,
)

log = logging.getLogger(__name__)
T = GameMsgType
E = GameErrorCode


# ------------------------------------------------------------------------------------------------ errors


class RemoteGameError(Exception):
    """The scheduler refused a request (an ERROR reply), or the request could not be made."""

    def __init__(self, code: int, message: str, ref_type: int = 0):
        self.code, self.message, self.ref_type = int(code), message, ref_type
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"{code_name(self.code)} ({self.code}): {self.message}"


class UnknownNpcError(RemoteGameError, KeyError):
    pass


class RemoteInvalidRequest(RemoteGameError, ValueError):
    pass


class RemoteCardTooLarge(RemoteGameError, ValueError):
    pass


class RemoteOverloaded(RemoteGameError):
    """OVERLOADED or SHUTTING_DOWN: retry later (or elsewhere)."""


class RemoteNotSupported(RemoteGameError, NotImplementedError):
    pass


class RemoteTimeout(RemoteGameError, TimeoutError):
    def __init__(self, message: str, ref_type: int = 0):
        super().__init__(E.TIMEOUT, message, ref_type)


_ERROR_CLASSES = {
    E.UNKNOWN_NPC: UnknownNpcError, E.UNKNOWN_HORDE: UnknownNpcError,
    E.CARD_TOO_LARGE: RemoteCardTooLarge,
    E.OVERLOADED: RemoteOverloaded, E.SHUTTING_DOWN: RemoteOverloaded,
    E.NOT_SUPPORTED: RemoteNotSupported,
    **{code: RemoteInvalidRequest for code in (E.BAD_FIELD, E.BAD_PAYLOAD, E.BAD_POSITION, E.LIMIT_EXCEEDED,
                                               E.INVALID_REQUEST, E.DUPLICATE_NPC, E.BAD_CARD, E.TOO_LARGE)},
}


def error_for(code: int, message: str, ref_type: int = 0) -> RemoteGameError:
    """The exception for an ERROR reply of this code."""
    if code == E.TIMEOUT:
        return RemoteTimeout(message, ref_type)
    return _ERROR_CLASSES.get(code, RemoteGameError)(code, message, ref_type)


# ------------------------------------------------------------------------------------------- asyncio


class AsyncRemoteGameClient:
    """One DEALER connection to an npc-scheduler (see the module doc). Use on one event loop."""

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, client_id: str = "",
                 curve_server_key: bytes | str | None = None,
                 curve_client_keys: tuple[bytes | str, bytes | str] | None = None,
                 limits: GameLimits = DEFAULT_LIMITS, hwm: int = 10_000):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.client_id = client_id or f"game-{uuid.uuid4().hex[:8]}"
        self.limits = limits
        self.server_info: dict | None = None  # the HELLO_REPLY's fields
        self._curve = (curve_server_key, curve_client_keys)
        self._hwm = hwm
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._corr = itertools.count(1)
        self._pending: dict[int, tuple[int, asyncio.Future]] = {}  # corr_id -> (reply type, future)
        self._streams: dict[int, asyncio.Queue] = {}  # talks: corr_id -> their messages
        self._closed = False
        self.counters = {"dropped_replies": 0, "bad_replies": 0}

    async def __aenter__(self) -> AsyncRemoteGameClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------- connection

    async def connect(self) -> dict:
        """Connects and says HELLO; returns the scheduler's HELLO_REPLY (limits, archetypes, features)."""
        if self._socket is None:
            ctx = zmq.asyncio.Context.instance()
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = self._hwm
            sock.maxmsgsize = 4 * max(self.limits.max_frame_bytes, self.limits.max_meta_bytes)
            server_key, client_keys = self._curve
            if server_key is not None:
                public, secret = client_keys if client_keys is not None else zmq.curve_keypair()
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
                    _key(server_key), _key(public), _key(secret))
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as e:
                sock.close(linger=0)
                raise RemoteGameError(E.INVALID_REQUEST,
                                      f"cannot connect to {self.endpoint!r}: {e}") from None
            self._socket = sock
            self._reader = asyncio.create_task(self._read(), name="npc-game-client-reader")
        reply = await self._request(T.HELLO, {"client_id": self.client_id})
        if not set(reply["versions"]) & set(SUPPORTED_VERSIONS):
            raise RemoteGameError(E.UNSUPPORTED_VERSION, f"the scheduler speaks versions "
                                  f"{reply['versions']}, this client {list(SUPPORTED_VERSIONS)}")
        self.server_info = reply
        return reply

    async def close(self) -> None:
        """GOODBYE (the scheduler cancels this client's work in flight), then closes; idempotent."""
        if self._closed:
            return
        if self._socket is not None and self._reader is not None and not self._reader.done():
            with contextlib.suppress(RemoteGameError, GameProtocolError):
                await self._request(T.GOODBYE, {}, timeout_s=min(1.0, self.timeout_s))
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._socket is not None:
            self._socket.close(linger=0)
        error = RemoteGameError(E.INTERNAL, "the client was closed")
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for stream in self._streams.values():
            stream.put_nowait(error)
        self._pending.clear()

    async def _read(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                msg = decode(frames, SCHEDULER_TO_GAME, self.limits)
            except GameProtocolError as e:
                self.counters["bad_replies"] += 1
                log.warning("undecodable message from the scheduler: %s", e)
                self._fail(e.corr_id, RemoteGameError(e.code, f"the scheduler's reply breaks the protocol: "
                                                      f"{e.message}", e.ref_type))
                continue
            self._route(msg)

    def _route(self, msg: GameMessage) -> None:
        stream = self._streams.get(msg.corr_id)
        if stream is not None:
            stream.put_nowait(msg)
            return
        entry = self._pending.pop(msg.corr_id, None)
        if entry is None:
            self.counters["dropped_replies"] += 1  # a reply after its request timed out or was cancelled
            return
        reply_type, future = entry
        if future.done():
            return
        if msg.msg_type == T.ERROR:
            future.set_exception(error_for(msg.fields["code"], msg.fields["message"], msg.fields["ref_type"]))
        elif msg.msg_type == reply_type:
            future.set_result(msg.fields)
        else:
            future.set_exception(RemoteGameError(E.INTERNAL, f"expected {T(reply_type).name}, the scheduler "
                                                 f"answered {msg.name}"))

    def _fail(self, corr_id: int, error: RemoteGameError) -> None:
        if corr_id in self._streams:
            self._streams[corr_id].put_nowait(error)
        entry = self._pending.pop(corr_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(error)

    def _encode(self, msg_type: int, corr_id: int, fields: Mapping) -> list[bytes]:
        """The frames; a request this side can already tell is bad raises the error the scheduler would."""
        if self._closed:
            raise RemoteGameError(E.INTERNAL, "the client is closed")
        try:
            return encode(msg_type, corr_id, fields, self.limits)
        except GameProtocolError as e:
            raise error_for(e.code, e.message, msg_type) from None

    async def _send(self, frames: list[bytes]) -> None:
        if self._socket is None:
            raise RemoteGameError(E.INTERNAL, "not connected: call connect() (or use `async with`) first")
        await self._socket.send_multipart(frames)

    def _send_nowait(self, msg_type: int, fields: Mapping) -> None:
        if self._socket is None or self._closed:
            return
        with contextlib.suppress(Exception):  # best effort (a CANCEL): never raises, never blocks
            sent = self._socket.send_multipart(encode(msg_type, next(self._corr), fields, self.limits),
                                               flags=zmq.NOBLOCK)
            sent.exception()  # retrieved (a full queue only loses the CANCEL)

    async def _request(self, msg_type: int, fields: Mapping, timeout_s: float | None = None) -> dict:
        corr_id = next(self._corr)
        frames = self._encode(msg_type, corr_id, fields)
        future = asyncio.get_running_loop().create_future()
        self._pending[corr_id] = (msg_type | REPLY_BIT, future)
        wait = self.timeout_s if timeout_s is None else timeout_s
        try:
            await self._send(frames)
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            if msg_type not in (T.HELLO, T.GOODBYE):
                self._send_nowait(T.CANCEL, {"corr_id": corr_id})
            raise RemoteTimeout(f"no answer to {T(msg_type).name} from the scheduler at {self.endpoint} "
                                f"within {wait} s (is npc-scheduler running there?)", msg_type) from None
        finally:
            self._pending.pop(corr_id, None)

    # ---------------------------------------------------------------------------- NPCs and positions

    async def register_npc(self, npc_id: str, archetype: str, subfaction: str | None = None, *,
                           position: Sequence[float] | None = None, name: str | None = None,
                           stacks: Mapping[str, Sequence[str]] | None = None) -> None:
        npc = {"npc_id": npc_id, "archetype": archetype, "subfaction": subfaction, "name": name,
               "stacks": {task: list(stack) for task, stack in (stacks or {}).items()}}
        await self.register_npcs([npc], None if position is None else [position])

    async def register_npcs(self, npcs: Sequence[Mapping], positions: np.ndarray | None = None) -> int:
        """Bulk registration: records {"npc_id", "archetype", "subfaction", "name", "stacks"} (the last three
        optional) and optionally positions [N, 3]. All or none: a bad record registers nothing."""
        records = [{k: v for k, v in dict(npc).items() if v is not None} for npc in npcs]
        fields = {"npcs": records} if positions is None else {"npcs": records, "positions": positions}
        return (await self._request(T.REGISTER_NPCS, fields))["registered"]

    async def despawn(self, npc_ids: Iterable[str]) -> int:
        """Removes NPCs; returns how many were registered (unknown ids are ignored)."""
        return (await self._request(T.DESPAWN, {"npc_ids": list(npc_ids)}))["despawned"]

    async def update_positions(self, npc_ids: Sequence[str], positions: np.ndarray) -> None:
        """Bulk position update: positions [len(npc_ids), 3] in meters (sent as float32)."""
        await self._request(T.POSITIONS, {"npc_ids": list(npc_ids), "positions": positions})

    async def tick(self, players: Mapping[str, Sequence[float]], npc_ids: Sequence[str] | None = None,
                   npc_positions: np.ndarray | None = None) -> TickResult:
        """Re-tiers every NPC from the players' positions (optionally moving NPCs first, in the same
        message)."""
        ids = list(players)
        positions = np.asarray([players[p] for p in ids], dtype=float).reshape(-1, 3)
        fields = {"players": ids, "player_positions": positions}
        if npc_ids:
            fields |= {"npc_ids": list(npc_ids), "npc_positions": npc_positions}
        return tick_from_wire(await self._request(T.TICK, fields))

    async def set_override(self, npc_id: str, *, forced: str | None | EllipsisType = ...,
                           relationship: float | None | EllipsisType = ...) -> None:
        """Tier floors from the game, applied from the next tick: `forced` ("gold" / "silver" / "bronze", a
        quest flag: the NPC stays at least there), `relationship` (a score in [-100, 100]; high keeps it at
        least Silver). None clears one; leaving an argument out keeps its value. RemoteNotSupported when the
        scheduler has no overrides."""
        fields = {"npc_id": npc_id}
        if forced is not ...:
            fields["forced"] = forced if forced is None or isinstance(forced, str) else forced.name.lower()
        if relationship is not ...:
            fields["relationship"] = relationship
        await self._request(T.SET_OVERRIDE, fields)

    # -------------------------------------------------------------------------------------- requests

    async def talk(self, npc_id: str, player_id: str, text: str) -> AsyncIterator[str | TalkResult]:
        """Yields the reply's str chunks as they arrive, then one TalkResult."""
        corr_id = next(self._corr)
        frames = self._encode(T.TALK, corr_id, {"npc_id": npc_id, "player_id": player_id, "text": text})
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[corr_id] = stream
        finished, chunks = False, 0
        try:
            await self._send(frames)
            while True:
                try:
                    msg = await asyncio.wait_for(stream.get(), self.timeout_s)
                except TimeoutError:
                    raise RemoteTimeout(f"talk to {npc_id!r}: nothing from the scheduler at {self.endpoint} "
                                        f"for {self.timeout_s} s", T.TALK) from None
                if isinstance(msg, BaseException):
                    finished = True
                    raise msg
                if msg.msg_type == T.TALK_CHUNK:
                    chunks += 1
                    yield msg.fields["text"]
                elif msg.msg_type == T.TALK_DONE:
                    finished = True
                    if msg.fields["chunks"] != chunks:
                        log.warning("talk %d: %d chunks announced, %d received", corr_id,
                                    msg.fields["chunks"], chunks)
                    yield talk_result_from_wire(msg.fields)
                    return
                elif msg.msg_type == T.ERROR:
                    finished = True
                    raise error_for(msg.fields["code"], msg.fields["message"], msg.fields["ref_type"])
                else:
                    finished = True
                    raise RemoteGameError(E.INTERNAL, f"unexpected {msg.name} in the talk's stream")
        finally:
            self._streams.pop(corr_id, None)
            if not finished:  # the caller left early, or timed out: stop the reply in the scheduler
                self._send_nowait(T.CANCEL, {"corr_id": corr_id})

    async def act(self, npc_id: str, context: ActContext | Mapping) -> ActResult:
        """One validated action (or the safe default with the reason), decided on the game state sent."""
        reply = await self._request(T.ACT, {"npc_id": npc_id, **context_to_wire(context)})
        return act_result_from_wire(reply)

    async def act_horde(self, leader_or_horde_id: str | int,
                        context: ActContext | Mapping) -> dict[str, ActResult]:
        """The horde's leader decides, every member acts: {npc_id: ActResult}."""
        key = "horde_id" if isinstance(leader_or_horde_id, int) else "leader_id"
        reply = await self._request(T.ACT_HORDE, {key: leader_or_horde_id, **context_to_wire(context)})
        return {npc_id: act_result_from_wire(r) for npc_id, r in reply["results"].items()}

    async def hordes(self) -> dict[int, tuple[str, tuple[str, ...]]]:
        """{horde_id: (leader_id, member_ids)} as the scheduler clusters them now."""
        return hordes_from_wire(await self._request(T.HORDES, {}))

    # ------------------------------------------------------------------------ memory: events, cards

    async def event(self, npc_id: str, player_id: str, kind: str, text: str = "", **fields):
        """A game event (memory.events.GameEvent types: gift, insult, help, life_saved, attack, betrayal,
        promise*, quest_* ...; fields: quest_id, trust_delta, affinity_delta): updates the cards, a salient
        fact and the emotional trajectory. Returns memory.store.EventOutcome."""
        reply = await self._request(T.EVENT, {"npc_id": npc_id, "player_id": player_id, "type": kind,
                                              "text": text, **fields})
        return event_outcome_from_wire(reply)

    async def get_card(self, npc_id: str, player_id: str, card_type: str) -> Card | None:
        reply = await self._request(T.GET_CARD, {"npc_id": npc_id, "player_id": player_id,
                                                 "card_type": card_type})
        return None if reply["card"] is None else card_from_wire(reply["card"])

    async def put_card(self, card: Card | str | bytes) -> None:
        """Stores a card as given: a card object, or its JSON as memory.cards serializes it (what get_card's
        card gives with serialize_card: the game's state manager persists and restores that)."""
        if isinstance(card, bytes):
            card = card.decode("utf-8")
        await self._request(T.PUT_CARD, {"card": card if isinstance(card, str) else card_to_wire(card)})

    async def end_session(self, npc_id: str, player_id: str):
        """Folds the session into a summary, facts and an emotion point: memory.session.SessionOutcome."""
        return session_outcome_from_wire(await self._request(T.END_SESSION, {"npc_id": npc_id,
                                                                             "player_id": player_id}))

    async def stats(self) -> dict:
        return (await self._request(T.STATS, {}))["stats"]


def _key(value: bytes | str) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------- blocking


class RemoteGameClient:
    """Blocking facade: an AsyncRemoteGameClient on its own event loop thread; every call waits for it."""

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, **kwargs):
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="npc-remote-game-client",
                                        daemon=True)
        self._thread.start()
        self._client = AsyncRemoteGameClient(endpoint, timeout_s=timeout_s, **kwargs)
        try:
            self.server_info = self._call(self._client.connect())
        except BaseException:
            self.close()
            raise

    def _call(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout_s + 5.0)  # the async client times out first, with its message
        except TimeoutError:
            future.cancel()
            raise RemoteTimeout(f"no answer from the client's loop within {self.timeout_s + 5.0} s") from None

    def register_npc(self, npc_id: str, archetype: str, subfaction: str | None = None, **kwargs) -> None:
        self._call(self._client.register_npc(npc_id, archetype, subfaction, **kwargs))

    def register_npcs(self, npcs: Sequence[Mapping], positions: np.ndarray | None = None) -> int:
        return self._call(self._client.register_npcs(list(npcs), positions))

    def despawn(self, npc_ids: Iterable[str]) -> int:
        return self._call(self._client.despawn(list(npc_ids)))

    def update_positions(self, npc_ids: Sequence[str], positions: np.ndarray) -> None:
        self._call(self._client.update_positions(list(npc_ids), np.array(positions)))

    def tick(self, players: Mapping[str, Sequence[float]], npc_ids: Sequence[str] | None = None,
             npc_positions: np.ndarray | None = None) -> TickResult:
        return self._call(self._client.tick(dict(players), npc_ids, npc_positions))

    def set_override(self, npc_id: str, *, forced: str | None | EllipsisType = ...,
                     relationship: float | None | EllipsisType = ...) -> None:
        self._call(self._client.set_override(npc_id, forced=forced, relationship=relationship))

    def talk(self, npc_id: str, player_id: str, text: str) -> Iterator[str | TalkResult]:
        """Yields the chunks as they arrive, then the TalkResult; leaving early cancels the reply (CANCEL)."""
        limit = self.timeout_s + 5.0
        return iterate_on_loop(lambda: self._client.talk(npc_id, player_id, text), self._loop, limit,
                               lambda: RemoteTimeout(f"talk to {npc_id!r}: nothing for {limit} s"))

    def act(self, npc_id: str, context: ActContext | Mapping) -> ActResult:
        return self._call(self._client.act(npc_id, context))

    def act_horde(self, leader_or_horde_id: str | int, context: ActContext | Mapping) -> dict[str, ActResult]:
        return self._call(self._client.act_horde(leader_or_horde_id, context))

    def hordes(self) -> dict[int, tuple[str, tuple[str, ...]]]:
        return self._call(self._client.hordes())

    def event(self, npc_id: str, player_id: str, kind: str, text: str = "", **fields):
        return self._call(self._client.event(npc_id, player_id, kind, text, **fields))

    def get_card(self, npc_id: str, player_id: str, card_type: str) -> Card | None:
        return self._call(self._client.get_card(npc_id, player_id, card_type))

    def put_card(self, card: Card | str | bytes) -> None:
        self._call(self._client.put_card(card))

    def end_session(self, npc_id: str, player_id: str):
        return self._call(self._client.end_session(npc_id, player_id))

    def stats(self) -> dict:
        return self._call(self._client.stats())

    def close(self) -> None:
        """GOODBYE, closes the socket, stops the loop thread; idempotent."""
        if not self._loop.is_running():
            return
        try:
            self._call(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout_s)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> RemoteGameClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AsyncRemoteGameClient", "RemoteCardTooLarge", "RemoteGameClient", "RemoteGameError",
           "RemoteInvalidRequest", "RemoteNotSupported", "RemoteOverloaded", "RemoteTimeout", "TickResult",
           "UnknownNpcError", "error_for"]
