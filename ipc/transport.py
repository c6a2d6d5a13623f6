"""ZeroMQ sockets, endpoints and configuration of the IPC transport (ipc/PROTOCOL.md).

    config = IpcConfig()                                    # ipc:// in a 0700 directory, shared-memory ring
    worker = WorkerEndpoint(config, worker_id="w0")         # binds a ROUTER at worker.endpoint
    client = ClientEndpoint(config, worker.endpoint)        # a DEALER and the client's ring
    client.connect()                                        # HELLO: the worker maps the ring (or not)
    corr = client.send(batch)                               # arrays into the ring, or inline frames
    incoming = worker.recv(timeout_ms=100)                  # checked; arrays are views into the ring
    requests = [incoming.msg.engine_request(i) for i in range(len(incoming.msg))]  # prompts copied out
    worker.reply(incoming, BatchAck(accepted=len(requests)))  # the client frees the slot on this reply
    worker.send(incoming.peer, TokenDeltas(...))            # streamed: corr_id = the client's sequence

A worker drains its socket between engine steps with `while (m := worker.recv(0)) is not None` (and
sleeps in a zmq.Poller on worker.socket when idle); recv never raises for what a client sends.

Whether arrays go through shared memory or inline frames is decided here (IpcConfig.transport, and whether
the worker could map the client's ring), never by the code that builds or handles messages. One
`zmq.Context.instance()` serves the whole process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.utils import z85

from ipc.errors import ErrorCode, ProtocolError
from ipc.frames import Envelope, decode_frames, encode_frames
from ipc.messages import (
    CLIENT_TYPES,
    REPLY_BIT,
    SUPPORTED_VERSIONS,
    WORKER_TYPES,
    BatchBuilder,
    Error,
    Goodbye,
    GoodbyeReply,
    Hello,
    HelloReply,
    Limits,
    Message,
    MsgType,
    RingInfo,
)
from ipc.shm_ring import NAME, RingError, RingReader, RingWriter, SlotRef, check_geometry

log = logging.getLogger(__name__)

IPC_PATH_MAX = 107  # sun_path of a Unix socket address, less the terminating NUL
_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+|\*):(\d{1,5}|\*)")
# Replies that end the worker's hold on the ring slot their message's arrays came in.
_SLOT_RELEASING = frozenset({MsgType.BATCH_ACK, MsgType.WARM_PREFIX_REPLY, MsgType.ERROR})
_STREAMED = frozenset({MsgType.TOKEN_DELTAS, MsgType.COMPLETIONS})


# --- configuration ----------------------------------------------------------------------------------------


def _z85_key(value: object, what: str) -> bytes:
    key = value.encode("ascii") if isinstance(value, str) else value
    try:
        ok = isinstance(key, bytes) and len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"CurveKeys.{what} must be a 40-character z85 key (zmq.curve_keypair()), "
                         f"got {value!r}")
    return key


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (z85 text, as zmq.curve_keypair() makes them) for tcp:// endpoints.

    The worker sets server_public and server_secret; a client sets server_public and may set its own pair
    (one is made per socket otherwise). allowed_clients (worker only): the client public keys let in;
    None lets in every client that knows the server's public key.
    """

    server_public: bytes
    server_secret: bytes | None = None
    client_public: bytes | None = None
    client_secret: bytes | None = None
    allowed_clients: tuple[bytes, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("server_public", "server_secret", "client_public", "client_secret"):
            if getattr(self, name) is not None or name == "server_public":
                object.__setattr__(self, name, _z85_key(getattr(self, name), name))
        if (self.client_public is None) != (self.client_secret is None):
            raise ValueError("CurveKeys.client_public and client_secret go together")
        if self.allowed_clients is not None:
            object.__setattr__(self, "allowed_clients",
                               tuple(_z85_key(k, "allowed_clients") for k in self.allowed_clients))

    @classmethod
    def generate(cls, allowed_clients: tuple[bytes, ...] | None = None) -> CurveKeys:
        """A fresh server key pair (the worker's keys)."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret, allowed_clients=allowed_clients)

    def for_client(self, client_public: bytes | None = None, client_secret: bytes | None = None) -> CurveKeys:
        """What a client needs: the server's public key (never its secret) and optionally its own pair."""
        return CurveKeys(self.server_public, None, client_public, client_secret)


def default_endpoint_dir() -> str:
    """$XDG_RUNTIME_DIR/npc-ipc (per user, tmpfs, cleared at logout), else <tempdir>/npc-ipc-<uid>."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "npc-ipc")
    return os.path.join(tempfile.gettempdir(), f"npc-ipc-{os.geteuid()}")


def default_shm_dir() -> str:
    """Where shm_open puts segments on Linux; elsewhere a temp folder (a file-backed mapping)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class IpcConfig:
    """The transport's one configuration, checked when built (ValueError naming the field)."""

    # "ipc:///abs/path.sock" (its folder must be, or is created, mode 0700), "tcp://host:port" (port "*"
    # binds a free one; the worker reports it), or None: a fresh ipc:// path in endpoint_dir.
    endpoint: str | None = None
    endpoint_dir: str | None = None  # default: default_endpoint_dir()
    transport: str = "shm"  # "shm": arrays through a shared-memory ring when the worker maps it; "inline"
    ring_slots: int = 8  # batches in flight before a reply; with none free, arrays go inline
    slot_bytes: int = 1 << 20  # per slot, a multiple of 64: 1 MiB holds ~260k int32 tokens
    shm_dir: str = field(default_factory=default_shm_dir)
    shm_prefix: str = "npc-ipc"  # segment names: <prefix>-<pid>-<random>
    verify_checksum: bool = True  # the reader checks each slot's xor64 checksum (~3 us per 128 KiB)
    curve: CurveKeys | None = None
    limits: Limits = field(default_factory=Limits)
    hwm: int = 10_000  # messages queued per peer and direction; beyond, a worker's send is dropped (counted)
    linger_ms: int = 0  # how long close() keeps unsent messages

    def __post_init__(self) -> None:
        if self.transport not in ("shm", "inline"):
            raise ValueError(f"IpcConfig.transport must be 'shm' or 'inline', got {self.transport!r}")
        check_geometry(self.ring_slots, self.slot_bytes, self.limits.max_ring_bytes)
        if self.endpoint is not None:
            _check_endpoint(self.endpoint)
        for name in ("endpoint_dir", "shm_dir"):
            path = getattr(self, name)
            if path is not None and (not isinstance(path, str) or not os.path.isabs(path)):
                raise ValueError(f"IpcConfig.{name} must be an absolute path, got {path!r}")
        if not isinstance(self.shm_prefix, str) or not NAME.fullmatch(self.shm_prefix + "-0-0"):
            raise ValueError(f"IpcConfig.shm_prefix must match {NAME.pattern}, got {self.shm_prefix!r}")
        if self.curve is not None and not isinstance(self.curve, CurveKeys):
            raise ValueError(f"IpcConfig.curve must be CurveKeys or None, got {type(self.curve).__name__}")
        if not isinstance(self.limits, Limits):
            raise ValueError(f"IpcConfig.limits must be Limits, got {type(self.limits).__name__}")
        if type(self.hwm) is not int or self.hwm < 1 or type(self.linger_ms) is not int or self.linger_ms < 0:
            raise ValueError(f"IpcConfig.hwm must be >= 1 and linger_ms >= 0, got {self.hwm}, "
                             f"{self.linger_ms}")

    def with_limits(self, **changes) -> IpcConfig:
        """This config with some limits changed, e.g. with_limits(vocab_size=engine.vocab_size)."""
        return dataclasses.replace(self, limits=dataclasses.replace(self.limits, **changes))


def _check_endpoint(endpoint: str) -> None:
    if not isinstance(endpoint, str):
        raise ValueError(f"IpcConfig.endpoint must be a string, got {endpoint!r}")
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.isabs(path) or len(path.encode()) > IPC_PATH_MAX:
            raise ValueError(f"IpcConfig.endpoint: an ipc:// path must be absolute and at most "
                             f"{IPC_PATH_MAX} bytes, got {path!r}")
        return
    match = _TCP.fullmatch(endpoint)
    if match is None or (match.group(2) != "*" and not 0 < int(match.group(2)) < 65536):
        raise ValueError(f"IpcConfig.endpoint must be ipc:///path or tcp://host:port (port 1..65535 or *), "
                         f"got {endpoint!r}")


def ensure_private_dir(path: str) -> str:
    """Creates a directory of mode 0700 (or checks an existing one is ours and 0700); returns it."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode passes through the umask
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"endpoint directory {path} is not a directory (a symlink is refused)")
    if st.st_uid != os.geteuid():
        raise ValueError(f"endpoint directory {path} belongs to uid {st.st_uid}, not {os.geteuid()}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ValueError(f"endpoint directory {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be "
                         f"0700 (owner only), since anyone who can reach the socket can submit work")
    return path


def bind_address(config: IpcConfig) -> str:
    """The address a worker binds: config.endpoint (its ipc:// folder made private) or a fresh ipc:// path."""
    endpoint = config.endpoint
    if endpoint is None:
        folder = ensure_private_dir(config.endpoint_dir or default_endpoint_dir())
        endpoint = f"ipc://{folder}/worker-{os.getpid()}-{secrets.token_hex(4)}.sock"
        _check_endpoint(endpoint)
    elif endpoint.startswith("ipc://"):
        ensure_private_dir(os.path.dirname(endpoint[len("ipc://"):]))
    return endpoint


# --- sockets ----------------------------------------------------------------------------------------------


def context() -> zmq.Context:
    return zmq.Context.instance()


def async_context() -> zmq.Context:
    """The process's one context seen by asyncio (zmq.asyncio sockets): a shadow, not a second context."""
    import zmq.asyncio

    return zmq.asyncio.Context(shadow=context())


def _socket(kind: int, config: IpcConfig, ctx: zmq.Context | None = None) -> zmq.Socket:
    sock = (ctx or context()).socket(kind)
    sock.linger = config.linger_ms
    sock.sndhwm = sock.rcvhwm = config.hwm
    # libzmq cuts a peer that sends a frame above this, with no reply possible; it sits well above the
    # limits that the receive path answers with TOO_LARGE, and bounds the memory one frame can take.
    sock.maxmsgsize = 4 * max(config.limits.max_frame_bytes, config.limits.max_meta_bytes)
    return sock


class _CurveAllowLists:
    """One ZAP handler per process: each worker socket's ZAP domain -> the client keys it lets in."""

    def __init__(self):
        self._domains: dict[str, frozenset[bytes]] = {}
        self._auth = None
        self._lock = threading.Lock()

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = self._domains.get(domain)
        return allowed is None or client_key in allowed  # sockets without a list take any CURVE client

    def register(self, keys: tuple[bytes, ...]) -> str:
        with self._lock:
            if self._auth is None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(context())
                self._auth.start()
                self._auth.configure_curve_callback("*", self)
            domain = f"npc-ipc-{secrets.token_hex(6)}"
            self._domains[domain] = frozenset(keys)
            self._auth.configure_curve_callback(domain, self)
            return domain

    def unregister(self, domain: str) -> None:
        with self._lock:
            self._domains.pop(domain, None)
            if self._auth is not None:
                self._auth.credentials_providers.pop(domain, None)


_ALLOW_LISTS = _CurveAllowLists()


def bind_worker_socket(config: IpcConfig) -> tuple[zmq.Socket, str]:
    """A ROUTER bound as configured (CURVE server when keys are set); returns it and its actual address."""
    sock = _socket(zmq.ROUTER, config)
    sock.router_mandatory = 1  # a send to a client that is gone fails (counted) instead of vanishing
    keys = config.curve
    if keys is not None:
        if keys.server_secret is None:
            sock.close(linger=0)
            raise ValueError("a worker needs CurveKeys.server_secret")
        sock.curve_secretkey, sock.curve_publickey = keys.server_secret, keys.server_public
        if keys.allowed_clients is not None:
            sock.zap_domain = _ALLOW_LISTS.register(keys.allowed_clients).encode()
        sock.curve_server = True
    try:
        sock.bind(bind_address(config))
    except (zmq.ZMQError, ValueError):
        sock.close(linger=0)
        raise
    return sock, sock.last_endpoint.decode()


def connect_client_socket(config: IpcConfig, endpoint: str, ctx: zmq.Context | None = None) -> zmq.Socket:
    """A DEALER connected to a worker (CURVE client when keys are set); ctx=async_context() for asyncio."""
    _check_endpoint(endpoint)
    sock = _socket(zmq.DEALER, config, ctx)
    keys = config.curve
    if keys is not None:
        public, secret = keys.client_public, keys.client_secret
        if public is None:
            public, secret = zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys.server_public, public, secret
    sock.connect(endpoint)
    return sock


def _deadline(timeout_ms: int | None) -> float | None:
    return None if timeout_ms is None else time.monotonic() + timeout_ms / 1000


def _remaining_ms(deadline: float | None) -> int | None:
    return None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))


# --- the worker's side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    """A checked message from a client."""

    peer: bytes  # the client's ROUTER identity: where replies go
    msg_type: MsgType
    corr_id: int
    msg: Message
    slot: SlotRef | None = None  # set when the arrays are views into the client's ring


class WorkerEndpoint:
    """The worker's end: a bound ROUTER, the clients' mapped rings, ERROR replies to bad messages.

    recv() never raises for anything a peer sends: a bad message is answered with ERROR (counted in
    `errors`) and recv goes on to the next one. HELLO and GOODBYE are answered here (the ring is mapped or
    unmapped) and returned too, so the worker can track its clients.
    """

    def __init__(self, config: IpcConfig, worker_id: str = "", max_model_len: int = 0):
        self.config, self.limits = config, config.limits
        self.worker_id = worker_id or f"worker-{os.getpid()}"
        self.max_model_len = max_model_len
        self.socket, self.endpoint = bind_worker_socket(config)
        self._rings: dict[bytes, RingReader] = {}
        self._stream_seq: dict[bytes, int] = {}
        self.received = 0
        self.errors: Counter[str] = Counter()  # ERROR replies sent, by code name
        self.dropped: Counter[str] = Counter()  # messages that could not be sent, by reason

    def recv(self, timeout_ms: int | None = 0) -> Incoming | None:
        """The next valid message within timeout_ms (None: wait forever; 0: only what is queued)."""
        deadline = _deadline(timeout_ms)
        while self.socket.poll(_remaining_ms(deadline)):
            incoming = self._receive_one()
            if incoming is not None:
                return incoming
        return None

    def _receive_one(self) -> Incoming | None:
        frames = self.socket.recv_multipart(copy=False)
        self.received += 1
        peer = frames[0].bytes
        try:
            env = decode_frames(frames[1:], self.limits, CLIENT_TYPES, self._rings.get(peer))
        except ProtocolError as e:
            self.refuse(peer, e)
            return None
        except Exception as e:  # a gap in the checks must not stop the worker: answer, count, log
            log.exception("unexpected error while decoding a message from %r", peer)
            self.refuse(peer, ProtocolError(ErrorCode.INTERNAL, f"{type(e).__name__} while decoding: {e}"))
            return None
        incoming = Incoming(peer, MsgType(env.msg_type), env.corr_id, env.msg, env.slot)
        if incoming.msg_type == MsgType.HELLO:
            self._hello(incoming)
        elif incoming.msg_type == MsgType.GOODBYE:
            self.forget(peer)
            self.reply(incoming, GoodbyeReply())
        return incoming

    def _hello(self, incoming: Incoming) -> None:
        hello: Hello = incoming.msg
        self.forget(incoming.peer)
        mapped, why = self._map_ring(incoming.peer, hello.ring)
        reply = HelloReply(self.worker_id, SUPPORTED_VERSIONS, mapped, why, self.limits.vocab_size or 0,
                           self.max_model_len, self.limits.to_wire())
        self.reply(incoming, reply)

    def _map_ring(self, peer: bytes, ring: RingInfo | None) -> tuple[bool, str | None]:
        if ring is None:
            return False, None
        if self.config.transport != "shm":
            return False, "this worker takes arrays inline only"
        if len(self._rings) >= self.limits.max_clients:
            return False, f"{len(self._rings)} clients already have a ring mapped (max_clients)"
        try:
            self._rings[peer] = RingReader(ring.name, ring.slots, ring.slot_bytes, self.config.shm_dir,
                                           self.config.verify_checksum, self.limits.max_ring_bytes)
        except (RingError, OSError) as e:  # OSError: mmap itself failing (address space, memory)
            return False, str(e)
        return True, None

    def forget(self, peer: bytes) -> None:
        """Unmaps a client's ring and drops its state (GOODBYE, a new HELLO, or a client gone silent)."""
        ring = self._rings.pop(peer, None)
        if ring is not None:
            ring.close()
        self._stream_seq.pop(peer, None)

    def ring(self, peer: bytes) -> RingReader | None:
        return self._rings.get(peer)

    def is_current(self, incoming: Incoming) -> bool:
        """Whether a message's ring views still hold what was checked (the client kept the slot rule)."""
        ring = self._rings.get(incoming.peer)
        return incoming.slot is None or (ring is not None and ring.is_current(incoming.slot))

    def send(self, peer: bytes, msg: Message, corr_id: int | None = None) -> bool:
        """Sends without blocking; False (and counted in `dropped`) when the client is gone or backed up.

        corr_id None: the client's next stream sequence number for TOKEN_DELTAS / COMPLETIONS, else 0.
        """
        if corr_id is None:
            corr_id = self._next_seq(peer) if msg.TYPE in _STREAMED else 0
        frames, _ = encode_frames(msg, corr_id)
        try:
            self.socket.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped["send_queue_full"] += 1
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.dropped["peer_gone"] += 1
            return False
        return True

    def _next_seq(self, peer: bytes) -> int:
        seq = self._stream_seq[peer] = self._stream_seq.get(peer, 0) + 1
        return seq

    def reply(self, incoming: Incoming, msg: Message) -> bool:
        return self.send(incoming.peer, msg, incoming.corr_id)

    def refuse(self, peer: bytes, error: ProtocolError) -> bool:
        """Answers a message with ERROR (its corr_id and type when its header could be read)."""
        self.errors[error.code.name] += 1
        return self.send(peer, Error.from_exception(error), error.corr_id)

    def counters(self) -> dict:
        return {"received": self.received, "clients_with_ring": len(self._rings),
                "errors": dict(self.errors), "dropped": dict(self.dropped)}

    def close(self) -> None:
        for peer in list(self._rings):
            self.forget(peer)
        zap_domain = self.socket.zap_domain.decode() if self.config.curve else ""
        self.socket.close(linger=self.config.linger_ms)
        if zap_domain:
            _ALLOW_LISTS.unregister(zap_domain)
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint[len("ipc://"):])

    def __enter__(self) -> WorkerEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the client's side ------------------------------------------------------------------------------------


class ClientSession:
    """A client's protocol state without a socket: its ring, correlation ids, the slots lent to the worker.

    The sync ClientEndpoint wraps it; an asyncio client does the same around a zmq.asyncio DEALER:
    `frames = session.encode(msg)[1]` to send (copy=False), `session.decode(frames)` on every message
    received, `session.hello()` after (re)connecting, `session.worker_lost()` when heartbeats stop.
    """

    def __init__(self, config: IpcConfig, client_id: str = ""):
        self.config, self.limits = config, config.limits
        self.client_id = client_id
        self.ring: RingWriter | None = None
        self.shm = False  # the worker mapped our ring: arrays go through it
        self.worker: HelloReply | None = None
        self._ids = itertools.count(1)
        self._lent: dict[int, int] = {}  # corr_id -> ring slot the worker holds until it replies
        self.counters: Counter[str] = Counter()
        self.last_error: ProtocolError | None = None  # the last bad message from the worker

    def hello(self) -> Hello:
        """The HELLO to send first and after every reconnect; offers a fresh ring when transport="shm"."""
        self._drop_ring()
        if self.config.transport != "shm":
            return Hello(self.client_id)
        c = self.config
        self.ring = RingWriter(c.ring_slots, c.slot_bytes, c.shm_dir, c.shm_prefix)
        return Hello(self.client_id, RingInfo(self.ring.name, self.ring.slots, self.ring.slot_bytes))

    def encode(self, msg: Message, corr_id: int | None = None) -> tuple[int, list]:
        """(corr_id, frames) of a message; arrays go into the ring if the worker mapped it and a slot fits."""
        corr_id = next(self._ids) if corr_id is None else corr_id
        ring = self.ring if self.shm else None
        frames, slot = encode_frames(msg, corr_id, ring)
        if slot is not None:
            self._lent[corr_id] = slot.slot
        elif ring is not None and len(frames) > 2:
            self.counters["inline_fallback"] += 1  # ring full, or the arrays exceed a slot
        return corr_id, frames

    def encode_batch(self, builder: BatchBuilder, corr_id: int | None = None) -> tuple[int, list]:
        """encode(builder.build()), with the tokens packed straight into a ring slot when the worker maps
        the ring: the only copy of the tokens on the client is the packing itself."""
        views = None
        if self.shm:
            views = self.ring.reserve([4 * builder.num_tokens, 4 * (builder.num_segments + 1)])
        batch = builder.build(None if views is None else views[0].view(np.int32))
        return self.encode(batch, corr_id)

    def decode(self, frames: list) -> Envelope | None:
        """The worker's message, checked; None (counted, kept in last_error) for a bad one."""
        try:
            env = decode_frames(frames, self.limits, WORKER_TYPES)
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            self.last_error = e
            return None
        if env.msg_type in _SLOT_RELEASING:
            slot = self._lent.pop(env.corr_id, None)
            if slot is not None and self.ring is not None:
                self.ring.release(slot)
        if env.msg_type == MsgType.HELLO_REPLY:
            self._on_hello_reply(env.msg)
        return env

    def _on_hello_reply(self, reply: HelloReply) -> None:
        self.worker = reply
        self.shm = reply.ring_mapped and self.ring is not None
        if self.shm:
            self.ring.unlink()  # both sides have it mapped: no name is left to leak if either dies
        else:
            self._drop_ring()

    def worker_lost(self) -> None:
        """Forgets the worker (missed heartbeats, restart): its slots are free, a new HELLO is needed."""
        self._lent.clear()
        if self.ring is not None:
            self.ring.release_all()
        self.shm, self.worker = False, None

    def _drop_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.ring, self.shm = None, False
        self._lent.clear()

    def close(self) -> None:
        self._drop_ring()


class ClientEndpoint:
    """A synchronous client (tests, benchmarks, tools): a DEALER plus a ClientSession."""

    def __init__(self, config: IpcConfig, endpoint: str, client_id: str = ""):
        self.session = ClientSession(config, client_id)
        self.endpoint = endpoint
        self.socket = connect_client_socket(config, endpoint)
        self._pending: deque[Envelope] = deque()  # received while request() waited for something else

    def connect(self, timeout_ms: int = 5000) -> HelloReply:
        """HELLO (offering the ring); raises TimeoutError without an answer, ConnectionError on ERROR."""
        env = self.request(self.session.hello(), timeout_ms)
        if env.msg_type == MsgType.ERROR:
            raise ConnectionError(f"the worker refused HELLO: {env.msg.message}")
        return env.msg

    def send(self, msg: Message, corr_id: int | None = None) -> int:
        corr_id, frames = self.session.encode(msg, corr_id)
        self.socket.send_multipart(frames, copy=False)
        return corr_id

    def send_batch(self, builder: BatchBuilder) -> int:
        """Sends builder's batch, its tokens packed straight into the ring (ClientSession.encode_batch)."""
        corr_id, frames = self.session.encode_batch(builder)
        self.socket.send_multipart(frames, copy=False)
        return corr_id

    def recv(self, timeout_ms: int | None = None) -> Envelope | None:
        """The next message from the worker within timeout_ms; bad ones are skipped (session.counters)."""
        if self._pending:
            return self._pending.popleft()
        return self._receive(_deadline(timeout_ms))

    def _receive(self, deadline: float | None) -> Envelope | None:
        while self.socket.poll(_remaining_ms(deadline)):
            env = self.session.decode(self.socket.recv_multipart(copy=False))
            if env is not None:
                return env
        return None

    def request(self, msg: Message, timeout_ms: int = 5000) -> Envelope:
        """Sends msg and waits for its reply (or ERROR); raises TimeoutError when none comes."""
        return self.wait_for(self.send(msg), msg.TYPE, timeout_ms)

    def wait_for(self, corr_id: int, msg_type: int, timeout_ms: int = 5000) -> Envelope:
        """The reply (or ERROR) to the message of this type and corr_id; what else arrives meanwhile is
        kept for recv(). Raises TimeoutError when none comes."""
        wanted = (msg_type | REPLY_BIT, MsgType.ERROR)
        deadline = _deadline(timeout_ms)
        while True:
            env = self._receive(deadline)
            if env is None:
                raise TimeoutError(f"no reply to {MsgType(msg_type).name} {corr_id} within {timeout_ms} ms "
                                   f"from {self.endpoint}")
            if env.corr_id == corr_id and env.msg_type in wanted:
                return env
            self._pending.append(env)

    def close(self, goodbye: bool = True) -> None:
        """Says GOODBYE (best effort, never blocks), closes the socket and removes the ring."""
        if goodbye and self.session.worker is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart(self.session.encode(Goodbye())[1], flags=zmq.NOBLOCK)
        self.socket.close(linger=100 if goodbye else 0)
        self.session.close()

    def __enter__(self) -> ClientEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
