"""Error codes of the wire protocol and the exception that carries one (ipc/PROTOCOL.md, "Errors").

Kept apart from ipc/messages.py so that the shared-memory ring can raise them without importing the engine.
"""

from __future__ import annotations

from enum import IntEnum

MAX_ERROR_MESSAGE = 1000  # characters; error texts quote bad values, which may be long or hostile


class ErrorCode(IntEnum):
    # 1xx: framing (the header frame and frame sizes)
    MALFORMED_FRAME = 100
    BAD_MAGIC = 101
    UNSUPPORTED_VERSION = 102
    UNKNOWN_TYPE = 103
    BAD_FLAGS = 104
    TOO_LARGE = 105
    # 2xx: the metadata frame and array descriptors
    BAD_METADATA = 200
    BAD_FIELD = 201
    BAD_PAYLOAD = 202
    # 3xx: the shared-memory ring
    NO_RING = 300
    BAD_SLOT = 301
    STALE_GENERATION = 302
    CHECKSUM_MISMATCH = 303
    # 4xx: request content
    TOKEN_OUT_OF_RANGE = 400
    LIMIT_EXCEEDED = 401
    UNKNOWN_ADAPTER = 402
    DUPLICATE_REQUEST = 403
    UNKNOWN_REQUEST = 404
    INVALID_REQUEST = 405
    # 5xx: the worker's state
    OVERLOADED = 500
    SHUTTING_DOWN = 501
    INTERNAL = 502
    ADAPTER_LOAD_FAILED = 503
    WORKER_LOST = 504  # never sent: the client reports it when the worker stops answering


class ProtocolError(Exception):
    """A message that breaks the protocol; the receiver answers it with an ERROR message of this code.

    corr_id and ref_type name the offending message when its header could be read (0 otherwise).
    """

    def __init__(self, code: ErrorCode, message: str, *, corr_id: int = 0, ref_type: int = 0,
                 request_id: str | None = None):
        self.code = ErrorCode(code)
        self.message = message[:MAX_ERROR_MESSAGE]
        self.corr_id = corr_id
        self.ref_type = ref_type
        self.request_id = request_id
        super().__init__(f"{self.code.name} ({int(self.code)}): {self.message}")

    def attributed(self, corr_id: int, ref_type: int) -> ProtocolError:
        """This error, naming the message it answers (once that message's header has been read)."""
        self.corr_id, self.ref_type = corr_id, ref_type
        return self
