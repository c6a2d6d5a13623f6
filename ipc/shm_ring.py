"""A shared-memory ring of fixed slots that carries a batch's arrays on one host (ipc/PROTOCOL.md, "Ring").

The client (RingWriter) creates the segment, mode 0600, under a fresh name; the worker (RingReader) maps it
read-only and hands out numpy views into it without copying, after checking the slot reference a message
carries: slot index in range, the slot's generation equal to the message's (a slot rewritten since, or a
forged reference, fails), lengths and array bounds inside the slot, and an xor64 checksum of the used bytes
(the XOR of the data as little-endian u64 words, ~3 us per 128 KiB: it catches stray writes into a lent
slot, not an adversary, who could forge any checksum).

Layout (little endian; every header is one 64-byte cache line, slot data starts 64-byte aligned):

    segment header  magic "NPCR", u16 version, u16 reserved, u32 slots, u32 slot header bytes (64),
                    u64 slot_bytes (data capacity per slot, a multiple of 64)
    slot i          at 64 + i * (64 + slot_bytes):
                    u64 generation (0: never written), u64 length (used data bytes), u64 xor64 checksum
                    of data[0:length rounded up to 8] (the writer zeroes those pad bytes), then slot_bytes
                    of data

A slot belongs to the writer until the message naming it is sent, then to the reader until the worker's
reply to that message (BATCH_ACK, WARM_PREFIX_REPLY or ERROR) arrives; only then does the writer reuse it.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import secrets
import stat
import struct
import weakref
from dataclasses import dataclass

import numpy as np

from ipc.errors import ErrorCode, ProtocolError

SEGMENT_MAGIC = b"NPCR"
RING_VERSION = 1
SEGMENT_HEADER = struct.Struct("<4sHHIIQ")
SLOT_HEADER = struct.Struct("<QQQ")
HEADER_BYTES = 64
SLOT_ALIGN = 64
ARRAY_ALIGN = 8  # arrays start at offsets (within the slot data) that are multiples of 8
MAX_SLOTS = 4096
MAX_SLOT_BYTES = 1 << 30
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # no "/": a name cannot point outside the directory


class RingError(ValueError):
    """A segment that cannot be created or mapped (missing, wrong owner or mode, wrong geometry)."""


@dataclass(frozen=True)
class SlotRef:
    """What a message says about the slot holding its arrays."""

    slot: int
    generation: int
    length: int  # used data bytes


def segment_bytes(slots: int, slot_bytes: int) -> int:
    return HEADER_BYTES + slots * (HEADER_BYTES + slot_bytes)


def check_geometry(slots: int, slot_bytes: int, max_bytes: int | None = None) -> None:
    if type(slots) is not int or not 1 <= slots <= MAX_SLOTS:
        raise RingError(f"ring slots must be an int in 1..{MAX_SLOTS}, got {slots!r}")
    if type(slot_bytes) is not int or not SLOT_ALIGN <= slot_bytes <= MAX_SLOT_BYTES \
            or slot_bytes % SLOT_ALIGN:
        raise RingError(f"slot_bytes must be a multiple of {SLOT_ALIGN} in {SLOT_ALIGN}..{MAX_SLOT_BYTES}, "
                        f"got {slot_bytes!r}")
    if max_bytes is not None and segment_bytes(slots, slot_bytes) > max_bytes:
        raise RingError(f"a ring of {slots} x {slot_bytes} bytes exceeds the limit of {max_bytes} bytes")


def array_layout(nbytes: list[int]) -> tuple[list[int], int]:
    """Offsets (8-byte aligned) of arrays of these sizes packed in one slot, and the bytes used."""
    offsets, end = [], 0
    for n in nbytes:
        end = -(-end // ARRAY_ALIGN) * ARRAY_ALIGN
        offsets.append(end)
        end += n
    return offsets, end


class _Segment:
    """A mapped segment: the slot arithmetic both sides share."""

    slots: int
    slot_bytes: int
    _mm: mmap.mmap
    buffer: np.ndarray  # uint8 view of the whole segment

    def _slot_base(self, slot: int) -> int:
        return HEADER_BYTES + slot * (HEADER_BYTES + self.slot_bytes)

    def slot_header(self, slot: int) -> tuple[int, int, int]:
        """(generation, length, checksum) of a slot as the segment holds them now."""
        return SLOT_HEADER.unpack_from(self._mm, self._slot_base(slot))

    def checksum(self, data: int, length: int) -> int:
        """xor64 of the slot data starting at byte `data` (of the segment), `length` bytes used."""
        return xor64(self.buffer[data:data + _round8(length)])

    def _unmap(self) -> None:
        self.buffer = None
        # While views handed out are alive the mapping cannot close; it goes with the last of them.
        with contextlib.suppress(BufferError):
            self._mm.close()


class RingWriter(_Segment):
    """The client's side: creates the segment (mode 0600, a fresh name) and fills slots."""

    def __init__(self, slots: int, slot_bytes: int, directory: str = "/dev/shm", prefix: str = "npc-ipc"):
        check_geometry(slots, slot_bytes)
        self.slots, self.slot_bytes = slots, slot_bytes
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(8)}"
        if not NAME.fullmatch(self.name):
            raise RingError(f"segment name {self.name!r} does not match {NAME.pattern}")
        self.path = os.path.join(directory, self.name)
        self._mm = _create(self.path, segment_bytes(slots, slot_bytes))
        # Removes the name if this writer is dropped or the interpreter exits without close().
        self._unlinker = weakref.finalize(self, _unlink_quietly, self.path)
        self.buffer = np.frombuffer(self._mm, dtype=np.uint8)
        SEGMENT_HEADER.pack_into(self._mm, 0, SEGMENT_MAGIC, RING_VERSION, 0, slots, HEADER_BYTES, slot_bytes)
        self._generations = [0] * slots
        self._reserved: int | None = None  # a slot taken by reserve() for the next write()
        # Free slots as a stack: the slot released last is reused first, while its pages are still in
        # both processes' caches (cycling through every slot would stream the whole ring through memory).
        self._free = list(range(slots - 1, -1, -1))
        self._busy: set[int] = set()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def reserve(self, nbytes: list[int]) -> list[np.ndarray] | None:
        """Takes a free slot for arrays of these sizes and returns writable uint8 views where they go, so
        a caller can build them in place (a batch's tokens packed straight into shared memory); the next
        write() of arrays that sit in those views commits the slot without copying them.

        None when no slot is free or the arrays do not fit one.
        """
        self.cancel()
        offsets, length = array_layout(nbytes)
        if length > self.slot_bytes or not self._free:
            return None
        slot = self._take()
        data = self._slot_base(slot) + HEADER_BYTES
        self._reserved = slot
        return [self.buffer[data + o:data + o + n] for o, n in zip(offsets, nbytes)]

    def cancel(self) -> None:
        """Gives back a reserved slot that was not written."""
        if self._reserved is not None:
            self.release(self._reserved)
            self._reserved = None

    def write(self, arrays: list[np.ndarray]) -> tuple[SlotRef, list[int]] | None:
        """Puts the arrays into a free slot (or the reserved one, if they were built there, without copying
        them); returns the slot's reference and each array's offset in it.

        None when no slot is free or the arrays do not fit one (the caller sends them inline then).
        """
        offsets, length = array_layout([a.nbytes for a in arrays])
        if length > self.slot_bytes:
            self.cancel()
            return None
        slot = self._reserved_for(arrays, offsets)
        if slot is None:
            if not self._free:
                return None
            slot = self._take()
        base = self._slot_base(slot)
        data = base + HEADER_BYTES
        end = 0
        for array, offset in zip(arrays, offsets):
            self.buffer[data + end:data + offset] = 0  # alignment padding: covered by the checksum
            end = offset + array.nbytes
            target = self.buffer[data + offset:data + end]
            if array.ctypes.data != target.ctypes.data:  # not built in place
                target[:] = array.reshape(-1).view(np.uint8)
        self.buffer[data + end:data + _round8(end)] = 0
        generation = self._generations[slot] = self._generations[slot] + 1
        SLOT_HEADER.pack_into(self._mm, base, 0, length, self.checksum(data, length))
        struct.pack_into("<Q", self._mm, base, generation)
        return SlotRef(slot, generation, length), offsets

    def _take(self) -> int:
        slot = self._free.pop()
        self._busy.add(slot)
        # Generation 0 while the data changes, the new one last (a seqlock): a late or forged message that
        # names the slot's previous generation fails from the first byte written on.
        SLOT_HEADER.pack_into(self._mm, self._slot_base(slot), 0, 0, 0)
        return slot

    def _reserved_for(self, arrays: list[np.ndarray], offsets: list[int]) -> int | None:
        """The reserved slot, if the first array was built where reserve() put it."""
        slot, self._reserved = self._reserved, None
        if slot is None:
            return None
        data = self._slot_base(slot) + HEADER_BYTES
        if arrays[0].ctypes.data == self.buffer[data + offsets[0]:].ctypes.data:
            return slot
        self.release(slot)
        return None

    def release(self, slot: int) -> None:
        """Gives a slot back once the reader's reply to the message naming it has arrived."""
        if slot in self._busy:
            self._busy.remove(slot)
            self._free.append(slot)

    def release_all(self) -> None:
        """Frees every slot (the reader is gone: a worker that died or was replaced)."""
        self._reserved = None
        for slot in list(self._busy):
            self.release(slot)

    @property
    def linked(self) -> bool:
        return self._unlinker.alive

    def unlink(self) -> None:
        """Removes the name; both mappings stay valid, and nothing is left behind if either side dies."""
        self._unlinker()

    def close(self) -> None:
        self.unlink()
        if self.buffer is not None:
            self._unmap()


class RingReader(_Segment):
    """The worker's side: maps a client's segment read-only and hands out checked views into it."""

    def __init__(self, name: str, slots: int, slot_bytes: int, directory: str = "/dev/shm",
                 verify_checksum: bool = True, max_bytes: int | None = None):
        if type(name) is not str or not NAME.fullmatch(name):
            raise RingError(f"segment name {name!r} does not match {NAME.pattern}")
        check_geometry(slots, slot_bytes, max_bytes)
        self.name, self.slots, self.slot_bytes = name, slots, slot_bytes
        self.verify_checksum = verify_checksum
        self._mm = _attach(os.path.join(directory, name), segment_bytes(slots, slot_bytes))
        self.buffer = np.frombuffer(self._mm, dtype=np.uint8)  # read-only, as the mapping
        magic, version, _, seg_slots, header_bytes, seg_slot_bytes = SEGMENT_HEADER.unpack_from(self._mm, 0)
        if (magic, version, seg_slots, header_bytes, seg_slot_bytes) != (
                SEGMENT_MAGIC, RING_VERSION, slots, HEADER_BYTES, slot_bytes):
            self._unmap()
            raise RingError(f"segment {name} header ({magic!r}, version {version}, {seg_slots} x "
                            f"{seg_slot_bytes} bytes) does not match the ring announced "
                            f"({slots} x {slot_bytes})")

    def views(self, ref: SlotRef, arrays: list[tuple[np.dtype, tuple[int, ...], int]]) -> list[np.ndarray]:
        """Read-only views of the arrays (dtype, shape, byte offset in the slot data) a message names.

        Raises ProtocolError (BAD_SLOT, STALE_GENERATION, CHECKSUM_MISMATCH) instead of reading outside
        the slot or trusting a slot that was rewritten.
        """
        data = self._check_ref(ref)
        spans = []
        for i, (dtype, shape, offset) in enumerate(arrays):
            nbytes = dtype.itemsize * math.prod(shape)
            if offset < 0 or offset % ARRAY_ALIGN or offset + nbytes > ref.length:
                raise ProtocolError(ErrorCode.BAD_SLOT, f"array {i} at offset {offset} ({nbytes} bytes) "
                                    f"lies outside the slot's {ref.length} used bytes or is not "
                                    f"{ARRAY_ALIGN}-aligned")
            spans.append((data + offset, nbytes))
        if self.verify_checksum:
            checksum = self.slot_header(ref.slot)[2]
            if self.checksum(data, ref.length) != checksum:
                raise ProtocolError(ErrorCode.CHECKSUM_MISMATCH, f"slot {ref.slot}: its bytes do not match "
                                    f"its xor64 checksum 0x{checksum:016x}")
        views = [self.buffer[start:start + nbytes].view(dtype).reshape(shape)
                 for (start, nbytes), (dtype, shape, _) in zip(spans, arrays)]
        if not self.is_current(ref):  # rewritten while being checked: a writer that broke the ownership rule
            raise ProtocolError(ErrorCode.STALE_GENERATION, f"slot {ref.slot} was rewritten while being read")
        return views

    def _check_ref(self, ref: SlotRef) -> int:
        """Checks a slot reference against the segment; returns where the slot's data starts."""
        if not 0 <= ref.slot < self.slots:
            raise ProtocolError(ErrorCode.BAD_SLOT, f"slot {ref.slot} does not exist (the ring has "
                                f"{self.slots} slots)")
        generation, length, _ = self.slot_header(ref.slot)
        if ref.generation == 0 or generation != ref.generation:
            raise ProtocolError(ErrorCode.STALE_GENERATION, f"slot {ref.slot} holds generation {generation}, "
                                f"the message names {ref.generation} (stale or forged)")
        if length > self.slot_bytes or ref.length != length:
            raise ProtocolError(ErrorCode.BAD_SLOT, f"slot {ref.slot} holds {length} bytes, the message says "
                                f"{ref.length} (capacity {self.slot_bytes})")
        return self._slot_base(ref.slot) + HEADER_BYTES

    def is_current(self, ref: SlotRef) -> bool:
        """Whether the slot still holds the generation the message named (views into it are still good)."""
        return 0 <= ref.slot < self.slots and self.slot_header(ref.slot)[0] == ref.generation

    def close(self) -> None:
        if self.buffer is not None:
            self._unmap()


def xor64(data: np.ndarray) -> int:
    """XOR of a byte array (length a multiple of 8) taken as little-endian u64 words; 0 when empty."""
    if not len(data):
        return 0
    return int(np.bitwise_xor.reduce(data.view("<u8")))


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _create(path: str, size: int) -> mmap.mmap:
    # O_EXCL: never reuse (or follow a symlink planted at) an existing name.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only clear bits; make the mode exactly owner read/write
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _attach(path: str, size: int) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise RingError(f"cannot open segment {path}: {e.strerror} "
                        f"(is the client on another host?)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RingError(f"segment {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise RingError(f"segment {path} belongs to uid {st.st_uid}, not to this process's "
                            f"{os.geteuid()}")
        if st.st_mode & 0o077:
            raise RingError(f"segment {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600")
        if st.st_size != size:
            raise RingError(f"segment {path} is {st.st_size} bytes, the ring announced needs {size}")
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
