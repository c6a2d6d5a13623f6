"""`npc-scheduler serve`: the scheduler process, serving the game-facing protocol (ipc/GAME_PROTOCOL.md).

    npc-scheduler serve --worker ipc:///run/user/1000/npc-ipc/w0.sock \\
        --endpoint ipc:///run/user/1000/npc-ipc/sched.sock --model /models/qwen2.5-7b-instruct \\
        [--redis-url redis://...] [--key-prefix npc:mem:] [--adapters vampire.sub.nosferatu ...] \\
        [--config scheduler.json]

One asyncio process owns one SchedulerServer (tier_scheduler/server.py) on a MemoryStore (Redis) and a
WorkerClient (the GPU worker), plus a ZeroMQ ROUTER that games connect to with a DEALER
(plugin_bindings.remote, or a C/C#/C++ plugin written from the protocol page). It prints one line,
`npc-scheduler ready <endpoint> resident=[...]`, once the socket is bound, and stops cleanly on SIGTERM or
SIGINT: new requests are refused with SHUTTING_DOWN, work in flight gets `--drain-timeout` seconds to finish,
then everything is closed and the process exits 0.

Message handling (GameService): every message is decoded and checked by tier_scheduler.game_wire; a bad one
is answered with ERROR and the service keeps serving. HELLO, STATS, CANCEL and GOODBYE are answered inline;
every other request runs as its own task, started in arrival order (each one's synchronous part, e.g. a
registration, a position update or a tick's re-tiering, takes effect before the next message is read), at
most `--max-in-flight` per client (beyond: OVERLOADED). A TALK streams TALK_CHUNK messages, then TALK_DONE.
The adapters the worker holds (its STATS: host tier + device slots) are what the server may use; they are
read at start and every `--adapters-refresh` seconds; `--adapters NAME...` asks the worker to load these
first (from its adapters folder).

`--config FILE` takes the scheduler's settings from a JSON object whose keys are fields of SchedulerConfig
(tier_scheduler/config.py: tiers, queues, deadlines, batching, output lengths ...) and of ServerConfig
(tier_scheduler/server.py: temperatures, worker timeout, chains, hordes ...); a field left out keeps its
default, lists stand for tuples. An unknown key, a value of the wrong type or one the configs refuse stops
the process before it connects to anything: one line naming the key on stderr, exit code 2.

    {"gold_act_max_tokens": 64, "silver_act_max_tokens": 64, "talk_temperature": 0.7}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import difflib
import inspect
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import zmq
import zmq.asyncio

from memory.cards import CardError, CardTooLarge, deserialize_card
from memory.events import GAME_EVENT_TYPES, GameEvent
from memory.store import MemoryUnavailable
from tier_scheduler.config import ARCHETYPES, SchedulerConfig
from tier_scheduler.game_wire import (
    ABSENT,
    DEFAULT_LIMITS,
    GAME_TO_SCHEDULER,
    REPLY_BIT,
    SUPPORTED_VERSIONS,
    GameErrorCode,
    GameLimits,
    GameMessage,
    GameMsgType,
    GameProtocolError,
    act_result_to_wire,
    card_to_wire,
    context_from_wire,
    decode,
    encode,
    error_frames,
    event_outcome_to_wire,
    hordes_to_wire,
    plain,
    session_outcome_to_wire,
    talk_result_to_wire,
    tick_to_wire,
)
from tier_scheduler.server import EMOTIONS, SchedulerServer, ServerConfig, TalkResult

log = logging.getLogger("npc-scheduler")

T = GameMsgType
E = GameErrorCode
INLINE = frozenset({T.HELLO, T.STATS, T.CANCEL, T.GOODBYE})  # answered at once, outside the in-flight bound
OPTIONAL_FEATURES = {"set_override": T.SET_OVERRIDE, "hordes": T.HORDES, "act_horde": T.ACT_HORDE}


class GameService:
    """The game-facing ROUTER in front of a SchedulerServer (see the module doc)."""

    def __init__(self, server: SchedulerServer, *, limits: GameLimits = DEFAULT_LIMITS, server_id: str = "",
                 max_in_flight: int = 64):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.server = server
        self.limits = limits
        self.server_id = server_id or f"npc-scheduler-{os.getpid()}"
        self.max_in_flight = max_in_flight
        self.socket: zmq.asyncio.Socket | None = None
        self.endpoint = ""
        self.draining = False
        self._work: dict[bytes, dict[int, asyncio.Task]] = {}  # peer -> corr_id -> its task
        self._stopped: dict[tuple[bytes, int], str] = {}  # (peer, corr_id) -> why its task was cancelled
        self._handlers: dict[int, Callable[[bytes, GameMessage], Awaitable[dict]]] = {
            T.REGISTER_NPCS: self._register, T.DESPAWN: self._despawn, T.POSITIONS: self._positions,
            T.TICK: self._tick, T.SET_OVERRIDE: self._set_override, T.TALK: self._talk, T.ACT: self._act,
            T.ACT_HORDE: self._act_horde, T.HORDES: self._hordes, T.EVENT: self._event,
            T.GET_CARD: self._get_card, T.PUT_CARD: self._put_card, T.END_SESSION: self._end_session,
        }
        self.counters: Counter[str] = Counter()

    # ----------------------------------------------------------------------------------------- socket

    def bind(self, endpoint: str, curve=None, hwm: int = 10_000) -> str:
        """Binds the ROUTER (ipc:// in a 0700 folder, or tcp:// with optional CURVE: ipc.transport.CurveKeys,
        an allow-list of client keys included); returns the address bound (a tcp port "*" resolved)."""
        from ipc.messages import Limits
        from ipc.transport import IpcConfig, bind_worker_socket

        biggest = max(self.limits.max_frame_bytes, self.limits.max_meta_bytes)
        # The worker's binder: private ipc folder, CURVE and ZAP allow-list, router_mandatory, and
        # ZMQ_MAXMSGSIZE = 4 x the largest frame (what ZeroMQ itself cuts, with no reply possible).
        config = IpcConfig(endpoint=endpoint, curve=curve, hwm=hwm, limits=Limits(
            max_frame_bytes=biggest, max_meta_bytes=biggest, max_batch_tokens=biggest // 4))
        sock, self.endpoint = bind_worker_socket(config)
        self.socket = zmq.asyncio.Socket.from_socket(sock)
        return self.endpoint

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=500)  # replies already queued (the last TALK_DONEs) still go out
            self.socket = None
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint[len("ipc://"):])

    def _send(self, peer: bytes, frames: list[bytes]) -> bool:
        """Never blocks: a client whose queue is full (it stopped reading) or that is gone loses its work."""
        if self.socket is None:
            return False
        sent = self.socket.send_multipart([peer, *frames], flags=zmq.NOBLOCK)
        error = sent.exception() if sent.done() else None  # NOBLOCK sends complete at once
        if error is None:
            self.counters["sent"] += 1
            return True
        self.counters["send_failures"] += 1
        log.warning("client %s is gone or not reading (%s): cancelling its %d requests in flight", peer.hex(),
                    error, len(self._work.get(peer, ())))
        self._cancel_peer(peer, "gone")
        return False

    def _reply(self, peer: bytes, msg_type: int, corr_id: int, fields: dict) -> bool:
        try:
            frames = encode(msg_type, corr_id, fields, self.limits)
        except GameProtocolError as e:  # our own reply breaks the protocol: a bug, but the client is told
            log.error("reply 0x%02x to corr_id %d does not encode: %s", msg_type, corr_id, e)
            error = GameProtocolError(E.INTERNAL, f"the scheduler could not encode its reply: {e}",
                                      corr_id=corr_id, ref_type=msg_type & ~REPLY_BIT)
            return self._refuse(peer, error)
        return self._send(peer, frames)

    def _refuse(self, peer: bytes, error: GameProtocolError) -> bool:
        self.counters[f"error_{code_label(error.code)}"] += 1
        return self._send(peer, error_frames(error, self.limits))

    # ------------------------------------------------------------------------------------------ loop

    async def run(self, stop: asyncio.Event, drain_timeout_s: float = 5.0) -> None:
        """Serves until `stop` is set, then drains (see the module doc) and returns."""
        reader = asyncio.create_task(self._read_loop(), name="game-reader")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([reader, stopping], return_when=asyncio.FIRST_COMPLETED)
        self.draining = True
        tasks = [t for work in self._work.values() for t in work.values()]
        log.info("stopping: draining %d requests in flight (up to %.1f s)", len(tasks), drain_timeout_s)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for peer, work in list(self._work.items()):
                for corr_id, task in list(work.items()):
                    if task in late:
                        self._stopped[(peer, corr_id)] = "shutdown"
                        task.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        for task in (reader, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _read_loop(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            try:
                if await self._dispatch(frames):
                    # Let the task just started run up to its first wait before the next message is read:
                    # state changes (register, positions, a tick's re-tiering) apply in arrival order.
                    await asyncio.sleep(0)
            except Exception:  # never let one message stop the service
                log.exception("handling a message failed")
                self.counters["internal_errors"] += 1

    async def _dispatch(self, frames: list[bytes]) -> bool:
        """Handles one message; True when it started a task."""
        self.counters["received"] += 1
        peer, rest = frames[0], frames[1:]
        try:
            msg = decode(rest, GAME_TO_SCHEDULER, self.limits)
        except GameProtocolError as e:
            self._refuse(peer, e)
            return False
        kind = msg.msg_type
        self.counters[GameMsgType(kind).name.lower()] += 1
        if kind in INLINE:
            self._inline(peer, msg)
            return False
        if self.draining:
            self._refuse(peer, _error(E.SHUTTING_DOWN, "the scheduler is shutting down and takes no new "
                                      "requests", msg))
            return False
        work = self._work.get(peer, {})
        if msg.corr_id in work:
            self._refuse(peer, _error(E.DUPLICATE_REQUEST, f"corr_id {msg.corr_id} is already in flight on "
                                      "this connection (use a fresh id per request)", msg))
            return False
        if len(work) >= self.max_in_flight:
            self._refuse(peer, _error(E.OVERLOADED, f"{len(work)} requests of this client are in flight, the "
                                      f"limit is {self.max_in_flight}: wait for replies, then retry", msg))
            return False
        task = asyncio.create_task(self._run(peer, msg), name=f"game-{GameMsgType(kind).name.lower()}")
        self._work.setdefault(peer, {})[msg.corr_id] = task
        task.add_done_callback(lambda _, key=(peer, msg.corr_id): self._forget(key))
        return True

    def _forget(self, key: tuple[bytes, int]) -> None:
        """A request's task ended (however: even cancelled before it ran): it no longer counts."""
        peer, corr_id = key
        self._stopped.pop(key, None)
        work = self._work.get(peer)
        if work is not None:
            work.pop(corr_id, None)
            if not work:
                del self._work[peer]

    def _inline(self, peer: bytes, msg: GameMessage) -> None:
        kind, reply_type = msg.msg_type, msg.msg_type | REPLY_BIT
        if kind == T.HELLO:
            self._reply(peer, reply_type, msg.corr_id, self._hello_fields())
        elif kind == T.STATS:
            self._reply(peer, reply_type, msg.corr_id, {"stats": plain(self.stats())})
        elif kind == T.CANCEL:
            task = self._work.get(peer, {}).get(msg.fields["corr_id"])
            if task is not None and not task.done():
                self._stopped[(peer, msg.fields["corr_id"])] = "client"
                task.cancel()
            self._reply(peer, reply_type, msg.corr_id, {"cancelled": task is not None})
        elif kind == T.GOODBYE:
            cancelled = self._cancel_peer(peer, "goodbye")
            self._reply(peer, reply_type, msg.corr_id, {"cancelled": cancelled})

    def _cancel_peer(self, peer: bytes, why: str) -> int:
        tasks = self._work.get(peer, {})
        for corr_id, task in tasks.items():
            if not task.done():
                self._stopped[(peer, corr_id)] = why
                task.cancel()
        return len(tasks)

    async def _run(self, peer: bytes, msg: GameMessage) -> None:
        try:
            fields = await self._handlers[msg.msg_type](peer, msg)
            self._reply(peer, msg.msg_type | REPLY_BIT, msg.corr_id, fields)
        except asyncio.CancelledError:
            why = self._stopped.get((peer, msg.corr_id))
            if why == "client":
                self._refuse(peer, _error(E.CANCELLED, "cancelled by the client (CANCEL)", msg))
            elif why == "shutdown":
                self._refuse(peer, _error(E.SHUTTING_DOWN, "the scheduler shut down before this request "
                                          "finished", msg))
            elif why is None:
                raise  # not ours: the service itself is being torn down
        except Exception as e:
            self._refuse(peer, refusal(e).attributed(msg.corr_id, msg.msg_type))

    # -------------------------------------------------------------------------------------- handlers

    def _hello_fields(self) -> dict:
        features = [name for name in OPTIONAL_FEATURES if hasattr(self.server, name)]
        limits = {**self.limits.to_wire(), "max_in_flight": self.max_in_flight,
                  "max_input_chars": self.server.config.max_input_chars}
        return {"server_id": self.server_id, "versions": list(SUPPORTED_VERSIONS), "limits": limits,
                "archetypes": list(ARCHETYPES), "emotions": list(EMOTIONS),
                "event_types": list(GAME_EVENT_TYPES), "features": features}

    def stats(self) -> dict:
        in_flight = sum(len(w) for w in self._work.values())
        return {**self.server.stats(), "service": {**self.counters, "clients_in_flight": len(self._work),
                                                   "in_flight": in_flight, "draining": self.draining}}

    def _registered(self, npc_id: str) -> bool:
        try:
            self.server.actor(npc_id)
        except KeyError:
            return False
        return True

    def _require_npcs(self, npc_ids, where: str = "npc_ids") -> None:
        """UNKNOWN_NPC naming the first id not registered (where: the field; "npc_id" for a single one)."""
        missing = [i for i, npc_id in enumerate(npc_ids) if not self._registered(npc_id)]
        if missing:
            first = missing[0]
            more = f" ({len(missing)} unknown ids in all)" if len(missing) > 1 else ""
            field = where if where == "npc_id" else f"{where}[{first}]"
            raise GameProtocolError(E.UNKNOWN_NPC, f"{field}: NPC {npc_ids[first]!r} is not registered{more}")

    async def _register(self, peer: bytes, msg: GameMessage) -> dict:
        npcs, positions = msg.fields["npcs"], msg.fields["positions"]
        seen: set[str] = set()
        for i, npc in enumerate(npcs):  # everything checked first: the message registers all or none
            npc_id = npc["npc_id"]
            if npc_id in seen or self._registered(npc_id):
                raise GameProtocolError(E.DUPLICATE_NPC, f"npcs[{i}].npc_id: {npc_id!r} "
                                        + ("appears twice" if npc_id in seen else "is already registered"))
            seen.add(npc_id)
            if npc["archetype"] not in ARCHETYPES:
                raise GameProtocolError(E.INVALID_REQUEST, f"npcs[{i}].archetype: unknown "
                                        f"{npc['archetype']!r}; expected one of {list(ARCHETYPES)}")
        done: list[str] = []
        for i, npc in enumerate(npcs):
            try:
                self.server.register_npc(
                    npc["npc_id"], npc["archetype"], npc["subfaction"], name=npc["name"],
                    position=None if positions is None else positions[i].astype(float),
                    stacks=npc["stacks"] or None)
            except ValueError as e:
                self.server.despawn(done)
                raise GameProtocolError(E.INVALID_REQUEST, f"npcs[{i}]: {e}") from None
            done.append(npc["npc_id"])
        return {"registered": len(done)}

    async def _despawn(self, peer: bytes, msg: GameMessage) -> dict:
        ids = msg.fields["npc_ids"]
        known = sum(self._registered(npc_id) for npc_id in set(ids))
        self.server.despawn(ids)
        return {"despawned": known}

    async def _positions(self, peer: bytes, msg: GameMessage) -> dict:
        ids = msg.fields["npc_ids"]
        self._require_npcs(ids)
        self.server.update_positions(ids, msg.fields["positions"])
        return {"updated": len(ids)}

    async def _tick(self, peer: bytes, msg: GameMessage) -> dict:
        f = msg.fields
        if f["npc_ids"]:
            self._require_npcs(f["npc_ids"])
            self.server.update_positions(f["npc_ids"], f["npc_positions"])
        players = {p: tuple(float(x) for x in row) for p, row in zip(f["players"], f["player_positions"])}
        ids = self.server.npc_ids()  # row -> NPC id of the TierUpdate: tick re-tiers before its first await
        update = await self.server.tick(players)
        return tick_to_wire(update, ids)

    async def _set_override(self, peer: bytes, msg: GameMessage) -> dict:
        set_override = self._feature("set_override", msg)
        f = msg.fields
        self._require_npcs([f["npc_id"]], "npc_id")
        given = {k: f[k] for k in ("forced", "relationship") if f[k] is not ABSENT}  # absent: kept as is
        result = set_override(f["npc_id"], **given)
        if inspect.isawaitable(result):
            await result
        return {}

    async def _talk(self, peer: bytes, msg: GameMessage) -> dict:
        f = msg.fields
        self._require_npcs([f["npc_id"]], "npc_id")
        chunks, result = 0, None
        step = self.limits.max_text
        async with contextlib.aclosing(self.server.talk(f["npc_id"], f["player_id"], f["text"])) as stream:
            async for item in stream:
                if isinstance(item, TalkResult):
                    result = item
                    continue
                for start in range(0, len(item), step):
                    if not self._reply(peer, T.TALK_CHUNK, msg.corr_id, {"text": item[start:start + step],
                                                                          "index": chunks}):
                        raise asyncio.CancelledError  # the client is gone: its work is being cancelled
                    chunks += 1
        if result is None:
            raise GameProtocolError(E.INTERNAL, "the talk ended without a result")
        self.counters["talk_chunks"] += chunks
        return _talk_done(result, chunks, self.limits)

    async def _act(self, peer: bytes, msg: GameMessage) -> dict:
        f = msg.fields
        self._require_npcs([f["npc_id"]], "npc_id")
        result = await self.server.act(f["npc_id"], context_from_wire(f))
        return act_result_to_wire(result, self.limits)

    async def _act_horde(self, peer: bytes, msg: GameMessage) -> dict:
        act_horde = self._feature("act_horde", msg)
        f = msg.fields
        if (f["leader_id"] is None) == (f["horde_id"] is None):
            raise GameProtocolError(E.BAD_FIELD, "ACT_HORDE names its horde by exactly one of leader_id and "
                                    "horde_id")
        context = context_from_wire(f)
        try:
            results = await act_horde(f["leader_id"] if f["horde_id"] is None else f["horde_id"], context)
        except KeyError as e:
            raise GameProtocolError(E.UNKNOWN_HORDE, _key_message(e)) from None
        return {"results": {npc_id: act_result_to_wire(r, self.limits) for npc_id, r in results.items()}}

    async def _hordes(self, peer: bytes, msg: GameMessage) -> dict:
        hordes = self._feature("hordes", msg)()
        if inspect.isawaitable(hordes):
            hordes = await hordes
        return hordes_to_wire(hordes)

    async def _event(self, peer: bytes, msg: GameMessage) -> dict:
        f = msg.fields
        event = GameEvent(f["type"], f["text"], f["quest_id"], f["trust_delta"], f["affinity_delta"])
        outcome = await self.server.memory.apply_event(f["npc_id"], f["player_id"], event)
        return event_outcome_to_wire(outcome)

    async def _get_card(self, peer: bytes, msg: GameMessage) -> dict:
        f = msg.fields
        card = await self.server.memory.get_card(f["npc_id"], f["player_id"], f["card_type"])
        return {"card": None if card is None else card_to_wire(card)}

    async def _put_card(self, peer: bytes, msg: GameMessage) -> dict:
        card = deserialize_card(msg.fields["card"], self.limits.max_card_bytes)
        await self.server.memory.put_card(card)
        return {}

    async def _end_session(self, peer: bytes, msg: GameMessage) -> dict:
        f = msg.fields
        outcome = await self.server.memory.end_session(f["npc_id"], f["player_id"])
        return session_outcome_to_wire(outcome)

    def _feature(self, name: str, msg: GameMessage):
        fn = getattr(self.server, name, None)
        if fn is None:
            raise GameProtocolError(E.NOT_SUPPORTED, f"{GameMsgType(msg.msg_type).name} is reserved: this "
                                    f"scheduler has no {name} yet (HELLO_REPLY.features lists what it has)")
        return fn


# -------------------------------------------------------------------------------------------- helpers


def code_label(code: int) -> str:
    try:
        return GameErrorCode(code).name.lower()
    except ValueError:
        return str(code)


def _error(code: int, message: str, msg: GameMessage) -> GameProtocolError:
    return GameProtocolError(code, message, corr_id=msg.corr_id, ref_type=msg.msg_type)


def _key_message(e: KeyError) -> str:
    return str(e.args[0]) if e.args else "unknown key"


def refusal(e: BaseException) -> GameProtocolError:
    """The ERROR that answers a request whose handling raised `e`."""
    if isinstance(e, GameProtocolError):
        return e
    if isinstance(e, CardTooLarge):
        return GameProtocolError(E.CARD_TOO_LARGE, str(e))
    if isinstance(e, CardError):
        return GameProtocolError(E.BAD_CARD, str(e))
    if isinstance(e, MemoryUnavailable):
        return GameProtocolError(E.MEMORY_UNAVAILABLE, str(e) or "memory (Redis) is unavailable")
    if isinstance(e, KeyError) and "not registered" in _key_message(e):
        return GameProtocolError(E.UNKNOWN_NPC, _key_message(e))  # despawned while the request waited
    if isinstance(e, ValueError):
        return GameProtocolError(E.INVALID_REQUEST, str(e))
    log.error("request failed", exc_info=e)
    return GameProtocolError(E.INTERNAL, f"{type(e).__name__}: {e}")


def _talk_done(result: TalkResult, chunks: int, limits: GameLimits) -> dict:
    fields = talk_result_to_wire(result, chunks)
    fields["reason"] = fields["reason"][:limits.max_text]
    return fields


# ---------------------------------------------------------------------------------------- the process


class StartupError(Exception):
    pass


def load_tokenizer(model_dir: str):
    """The worker's model's tokenizer, from its Hugging Face folder (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise StartupError(f"--model {model_dir}: cannot load its tokenizer: {e}") from None


async def worker_adapters(worker) -> set[str]:
    """The adapters the worker holds (host tier and device slots: a swap < 5 ms), from its STATS."""
    adapters = (await worker.stats()).get("adapters") or {}
    return set(adapters.get("cpu") or ()) | set(adapters.get("resident") or ())


async def ensure_adapters(worker, names: list[str]) -> set[str]:
    """Asks the worker to load each named adapter it does not hold yet; returns what it holds then."""
    held = await worker_adapters(worker)
    for name in names:
        if name not in held:
            try:
                await worker.load_adapter(name)
            except Exception as e:  # the turn degrades to a smaller stack, it does not fail
                log.warning("adapter %s could not be loaded by the worker: %s", name, e)
    return await worker_adapters(worker) if set(names) - held else held


async def _refresh_adapters(server: SchedulerServer, worker, held: set[str], every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            now = await worker_adapters(worker)
        except Exception as e:
            log.warning("reading the worker's adapters failed: %s", e)
            continue
        server.mark_resident(now - held)
        server.mark_resident(held - now, resident=False)
        held = now


def _curve_keys(args: argparse.Namespace):
    if not args.curve_keys:
        return None
    from ipc.transport import CurveKeys

    try:
        with open(args.curve_keys) as f:
            public, secret = (line.strip() for line in f.read().split()[:2])
        allowed = None
        if args.curve_allow:
            with open(args.curve_allow) as f:
                allowed = tuple(line.strip() for line in f if line.strip())
        return CurveKeys(public, secret, allowed_clients=allowed)
    except (OSError, ValueError) as e:
        raise StartupError(f"--curve-keys / --curve-allow: {e}") from None


def configs_from_mapping(values: Mapping) -> tuple[SchedulerConfig, ServerConfig]:
    """(SchedulerConfig, ServerConfig) from one flat mapping of their field names (absent: the default).
    ValueError names the key: unknown, of the wrong type (checked against the default's type: bool, int,
    number, a list for a tuple), or refused by the config's own checks."""
    if not isinstance(values, Mapping):
        raise ValueError(f"must be a JSON object of SchedulerConfig / ServerConfig fields, got "
                         f"{type(values).__name__}")
    owners = {f.name: (cls, f) for cls in (SchedulerConfig, ServerConfig) for f in dataclasses.fields(cls)}
    given: dict[type, dict] = {SchedulerConfig: {}, ServerConfig: {}}
    for key, value in values.items():
        if key not in owners:
            close = difflib.get_close_matches(str(key), owners, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = " and ".join(
                f"{cls.__name__} fields ({', '.join(f.name for f in dataclasses.fields(cls))})"
                for cls in (SchedulerConfig, ServerConfig))
            raise ValueError(f"unknown key {key!r}{hint}: the keys are {known}")
        cls, f = owners[key]
        given[cls][key] = _typed(key, value, f.default)
    built = []
    for cls, kwargs in given.items():
        try:
            built.append(cls(**kwargs))
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None  # the configs' messages name the field (Class.field ...)
    return built[0], built[1]


def _typed(key: str, value, default):
    """`value` checked against the type of the field's default (JSON has no tuples: a list stands for one)."""
    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = number(value), "a number"
    elif isinstance(default, tuple):
        kinds = {type(x) for x in default}
        want = f"a list of {'integers' if kinds == {int} else 'numbers'}"
        ok = isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) if kinds == {int}
                                             else number(x) for x in value)
        if ok:
            return tuple(value if kinds == {int} else map(float, value))
    else:
        ok, want = isinstance(value, type(default)), type(default).__name__
    if not ok:
        raise ValueError(f"key {key!r} must be {want}, got {json.dumps(value)}")
    return float(value) if isinstance(default, float) else value


def load_configs(path: str | None) -> tuple[SchedulerConfig, ServerConfig]:
    """The configs of `--config FILE` (the defaults without one); StartupError names the file and the key."""
    if path is None:
        return SchedulerConfig(), ServerConfig()
    try:
        with open(path) as f:
            values = json.load(f)
        return configs_from_mapping(values)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise StartupError(f"--config {path}: {e}") from None


async def serve(args: argparse.Namespace) -> int:
    from gpu_worker.client import ClientConfig, WorkerClient
    from memory.config import MemoryConfig
    from memory.store import MemoryStore, connect

    scheduler_config, server_config = getattr(args, "configs", None) or load_configs(args.config)
    curve = _curve_keys(args)
    tokenizer = load_tokenizer(args.model)
    try:
        memory_config = MemoryConfig(key_prefix=args.key_prefix, cold_restore=not args.no_cold_restore,
                                     embeddings=args.embeddings)
    except ValueError as e:
        raise StartupError(str(e)) from None
    redis_client = connect(args.redis_url, memory_config)
    memory = MemoryStore(redis_client, memory_config)
    worker = WorkerClient(args.worker, config=ClientConfig(heartbeat_timeout_s=args.worker_heartbeat_timeout,
                                                           connect_timeout_s=args.connect_timeout))
    server = service = refresher = None
    try:
        try:
            await worker.connect()
        except TimeoutError as e:
            raise StartupError(str(e)) from None
        try:
            await redis_client.ping()
        except Exception as e:  # the store serves degraded while Redis is down, and reconnects
            log.warning("Redis at %s does not answer (%s): serving without memory until it does",
                        args.redis_url or "REDIS_URL", e)
        held = await ensure_adapters(worker, args.adapters)
        server = SchedulerServer(scheduler_config, memory, worker, tokenizer, server_config=server_config,
                                 resident=held)
        await server.start()
        service = GameService(server, server_id=args.scheduler_id, max_in_flight=args.max_in_flight)
        try:
            endpoint = service.bind(args.endpoint, curve)
        except (ValueError, zmq.ZMQError) as e:
            raise StartupError(f"--endpoint {args.endpoint}: {e}") from None
        if args.adapters_refresh > 0:
            refresher = asyncio.create_task(_refresh_adapters(server, worker, held, args.adapters_refresh))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"npc-scheduler ready {endpoint} resident={sorted(held)}", flush=True)
        await service.run(stop, args.drain_timeout)
        log.info("stopped; %s", dict(service.counters))
        return 0
    finally:
        if refresher is not None:
            refresher.cancel()
        if server is not None:
            await server.close()
        if service is not None:
            service.close()
        await memory.aclose()
        await redis_client.aclose()
        await worker.close()


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", required=True, help="the GPU worker's endpoint (ipc:///... or tcp://host:port)")
    p.add_argument("--endpoint", required=True, help="where games connect: ipc:///abs/path.sock (its folder "
                   "0700) or tcp://host:port")
    p.add_argument("--model", required=True, help="the worker's model folder (its tokenizer is loaded "
                   "from it)")
    p.add_argument("--config", default=None, metavar="FILE", help="JSON object of SchedulerConfig and "
                   "ServerConfig fields (absent: defaults); a bad key or value: exit 2")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else redis://127.0.0.1:6379/0")
    p.add_argument("--key-prefix", default="npc:mem:", help="prefix of every Redis key of the memory")
    p.add_argument("--no-cold-restore", action="store_true", help="never ask the restore job for archived "
                   "history of pairs that Redis has forgotten")
    p.add_argument("--embeddings", action="store_true", help="rank salient facts by sentence-embedding "
                   "relevance (all-MiniLM-L6-v2, bundled; loaded at start, one short forward pass per "
                   "session start on the event loop) instead of keyword overlap")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME", help="adapters the worker should "
                   "load (from its adapters folder) before serving")
    p.add_argument("--adapters-refresh", type=float, default=30.0, help="seconds between reads of the "
                   "worker's adapters (0: only at start)")
    p.add_argument("--scheduler-id", default="", help="the server_id of HELLO_REPLY")
    p.add_argument("--max-in-flight", type=int, default=64, help="requests in flight per client")
    p.add_argument("--drain-timeout", type=float, default=5.0, help="seconds in-flight work may run after "
                   "SIGTERM")
    p.add_argument("--curve-keys", default=None, help="file with the server's z85 public and secret keys "
                   "(tcp:// only)")
    p.add_argument("--curve-allow", default=None, help="file of client public keys let in (one per line)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the worker")
    p.add_argument("--worker-heartbeat-timeout", type=float, default=5.0)
    p.add_argument("--log-level", default="INFO")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npc-scheduler", description="NPC tier scheduler (game-facing)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_args(sub.add_parser("serve", help="serve games over the protocol of ipc/GAME_PROTOCOL.md"))
    args = parser.parse_args(argv)
    if args.max_in_flight < 1:
        parser.error("--max-in-flight must be >= 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.configs = load_configs(args.config)  # before anything is connected: a bad file fails at once
        return asyncio.run(serve(args))
    except StartupError as e:
        print(f"npc-scheduler: cannot start: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
