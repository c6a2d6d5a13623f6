"""Messages <-> ZeroMQ frames: [header][metadata][payload 0]...[payload k-1] (ipc/PROTOCOL.md, "Frames").

Arrays travel one of two ways, chosen by the caller and invisible to the message code: in the sender's
shared-memory ring (FLAG_SHM: the metadata's "shm" map names the slot, each "arrays" entry an offset in it)
or inline, one payload frame per array, sent without copying. Either way the receiver gets numpy views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ipc.errors import ErrorCode, ProtocolError
from ipc.messages import FLAG_SHM, I32, U64, Header, Limits, Message, decode, encode, pack_meta, unpack_meta
from ipc.shm_ring import RingReader, RingWriter, SlotRef

MAX_ARRAYS = 4  # payload frames (or ring arrays) of one message
MAX_DIMS = 4
DTYPES = {"<i4": np.dtype("<i4")}  # version 1 sends int32 arrays only
_SHM_KEYS = frozenset({"slot", "generation", "length"})


@dataclass(frozen=True)
class Envelope:
    msg_type: int
    corr_id: int
    msg: Message
    slot: SlotRef | None = None  # set when the message's arrays are views into the sender's ring


def encode_frames(msg: Message, corr_id: int, ring: RingWriter | None = None) -> tuple[list, SlotRef | None]:
    """The frames of a message; its arrays go into `ring` when given and a slot is free, inline otherwise.

    Returns the frames (payload frames are the arrays themselves: send them with copy=False and leave them
    unchanged until sent) and the slot used, which stays the worker's until its reply arrives.
    """
    body, arrays = encode(msg)
    flags, payload, slot = 0, [], None
    placed = ring.write(arrays) if arrays and ring is not None else None
    if placed is not None:
        slot, offsets = placed
        body["shm"] = {"slot": slot.slot, "generation": slot.generation, "length": slot.length}
        body["arrays"] = [_descriptor(a) | {"offset": o} for a, o in zip(arrays, offsets)]
        flags = FLAG_SHM
    elif arrays:
        body["arrays"] = [_descriptor(a) for a in arrays]
        payload = arrays
    meta = pack_meta(body)
    header = Header(msg.TYPE, corr_id, flags, len(meta), len(payload), sum(a.nbytes for a in payload))
    return [header.pack(), meta, *payload], slot


def _descriptor(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


def decode_frames(frames: list, limits: Limits, accept: frozenset[int],
                  ring: RingReader | None = None) -> Envelope:
    """The message in these frames (bytes or zmq.Frame), checked throughout; raises ProtocolError.

    accept: the message types this side takes; ring: the sender's mapped ring, if any.
    """
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "a message needs a header frame")
    header = Header.parse(_view(frames[0]))
    try:
        return _decode_rest(header, frames, limits, accept, ring)
    except ProtocolError as e:
        raise e.attributed(header.corr_id, header.msg_type) from None


def _view(frame) -> memoryview:
    """A frame's bytes without copying (zmq.Frame.buffer, bytes, or an array handed over in-process)."""
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _decode_rest(header: Header, frames: list, limits: Limits, accept: frozenset[int],
                 ring: RingReader | None) -> Envelope:
    if header.msg_type not in accept:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"message type 0x{header.msg_type:02x} is not one this "
                            f"side accepts")
    meta, payload = _check_sizes(header, [_view(f) for f in frames[1:]], limits)
    body = unpack_meta(meta)
    arrays, slot = _arrays(header, body, payload, limits, ring)
    return Envelope(header.msg_type, header.corr_id, decode(header.msg_type, body, arrays, limits), slot)


def _check_sizes(header: Header, rest: list[memoryview], limits: Limits) -> tuple[memoryview, list]:
    if header.payload_frames > MAX_ARRAYS or len(rest) != 1 + header.payload_frames:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"header announces 1 metadata + "
                            f"{header.payload_frames} payload frames (at most {MAX_ARRAYS}); the message has "
                            f"{len(rest)} after it")
    meta, payload = rest[0], rest[1:]
    if len(meta) > limits.max_meta_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"metadata frame of {len(meta)} bytes; the limit is "
                            f"{limits.max_meta_bytes}")
    for i, frame in enumerate(payload):
        if len(frame) > limits.max_frame_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"payload frame {i} of {len(frame)} bytes; the limit is "
                                f"{limits.max_frame_bytes}")
    if len(meta) != header.meta_len:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"metadata frame is {len(meta)} bytes, the header "
                            f"says {header.meta_len} (truncated?)")
    if sum(len(f) for f in payload) != header.payload_bytes:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"payload frames hold {sum(len(f) for f in payload)} "
                            f"bytes, the header says {header.payload_bytes} (truncated?)")
    return meta, payload


def _arrays(header: Header, body: dict, payload: list, limits: Limits,
            ring: RingReader | None) -> tuple[list[np.ndarray], SlotRef | None]:
    """Pops the transport's keys ("arrays", "shm") from the body; returns the arrays they describe."""
    shm = body.pop("shm", None)
    in_ring = bool(header.flags & FLAG_SHM)
    if in_ring != (shm is not None):
        raise ProtocolError(ErrorCode.BAD_FIELD, "shm: the metadata has an 'shm' map exactly when the header "
                            "sets FLAG_SHM")
    descriptors = _descriptors(body.pop("arrays", []), limits, in_ring)
    if not in_ring:
        return _inline(descriptors, payload), None
    if payload:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME,
                            "a message whose arrays are in the ring has no payload frames")
    if ring is None:
        raise ProtocolError(ErrorCode.NO_RING, "no shared-memory ring is mapped for this client (send HELLO "
                            "with a ring first, or send the arrays inline)")
    ref = _slot_ref(shm)
    return ring.views(ref, descriptors), ref


def _descriptors(raw: object, limits: Limits, in_ring: bool) -> list[tuple[np.dtype, tuple, int]]:
    if type(raw) is not list or len(raw) > MAX_ARRAYS:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"arrays: expected an array of at most {MAX_ARRAYS} maps")
    keys = {"dtype", "shape", "offset"} if in_ring else {"dtype", "shape"}
    return [_descriptor_at(i, d, keys, limits) for i, d in enumerate(raw)]


def _descriptor_at(i: int, d: object, keys: set[str], limits: Limits) -> tuple[np.dtype, tuple, int]:
    if type(d) is not dict or set(d) != keys:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"arrays[{i}]: expected a map with exactly the keys "
                            f"{sorted(keys)}")
    dtype = DTYPES.get(d["dtype"]) if type(d["dtype"]) is str else None
    if dtype is None:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"arrays[{i}].dtype: must be one of {sorted(DTYPES)}")
    shape = d["shape"]
    if type(shape) is not list or not 1 <= len(shape) <= MAX_DIMS or not all(
            type(n) is int and 0 <= n <= I32 for n in shape):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"arrays[{i}].shape: expected 1..{MAX_DIMS} ints in "
                            f"[0, 2**31)")
    nbytes = dtype.itemsize * math.prod(shape)  # Python ints: a forged shape cannot wrap around
    if nbytes > limits.max_frame_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"arrays[{i}]: {nbytes} bytes; the limit is "
                            f"{limits.max_frame_bytes}")
    offset = d.get("offset", 0)
    if type(offset) is not int or not 0 <= offset <= U64:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"arrays[{i}].offset: expected an int >= 0")
    return dtype, tuple(shape), offset


def _inline(descriptors: list, payload: list[memoryview]) -> list[np.ndarray]:
    if len(descriptors) != len(payload):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"{len(descriptors)} arrays described, {len(payload)} "
                            f"payload frames sent")
    arrays = []
    for i, ((dtype, shape, _), frame) in enumerate(zip(descriptors, payload)):
        nbytes = dtype.itemsize * math.prod(shape)
        if len(frame) != nbytes:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"payload frame {i} is {len(frame)} bytes; "
                                f"arrays[{i}] ({dtype.str} {list(shape)}) needs {nbytes}")
        arrays.append(np.frombuffer(frame, dtype=dtype).reshape(shape))
    return arrays


def _slot_ref(shm: object) -> SlotRef:
    if type(shm) is not dict or set(shm) != _SHM_KEYS or not all(
            type(shm[k]) is int and 0 <= shm[k] <= U64 for k in _SHM_KEYS):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"shm: expected a map of exactly {sorted(_SHM_KEYS)}, "
                            f"unsigned ints")
    return SlotRef(shm["slot"], shm["generation"], shm["length"])
