"""The exception hierarchy and the protocol's error codes.

Everything the core raises is a :class:`TunnelError`.  Malformed or
out-of-place input from the peer is a :class:`RemoteProtocolError`; misuse of
the API by the local application is a :class:`LocalProtocolError`.  Both carry
the protocol error code (:class:`ErrorCode`) that goes on the wire in a
``STREAM_ABORT`` or ``GOODBYE`` frame.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ConnectionLost",
    "ErrorCode",
    "FlowControlError",
    "FrameTooLargeError",
    "LocalProtocolError",
    "ProtocolError",
    "RPCError",
    "RemoteProtocolError",
    "StreamAborted",
    "TunnelError",
]


class ErrorCode(IntEnum):
    """Error codes carried by ``GOODBYE``, ``STREAM_ABORT`` and ``RPC_ERROR``.

    The scope column of protocol.md says which ones end a stream, which end
    the connection and which only fail one RPC call.
    """

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    FRAME_SIZE_ERROR = 4
    UNSUPPORTED_VERSION = 5
    STREAM_STATE_ERROR = 6
    REFUSED_STREAM = 7
    DIGEST_MISMATCH = 8
    CANCEL = 9
    KEEPALIVE_TIMEOUT = 10
    APPLICATION_ERROR = 11
    UNKNOWN_PROCEDURE = 12
    CALL_TOO_LARGE = 13
    BUSY = 14
    CONNECTION_CLOSED = 15
    PERMISSION_DENIED = 16

    @classmethod
    def name_of(cls, code: int) -> str:
        """The symbolic name of *code*, or ``UNKNOWN(n)`` for unassigned codes."""
        try:
            return cls(code).name
        except ValueError:
            return f"UNKNOWN({code})"


class TunnelError(Exception):
    """Base class of every exception this library raises."""


class ProtocolError(TunnelError):
    """The protocol was violated, locally or by the peer."""

    def __init__(self, message: str, error_code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else ""


class LocalProtocolError(ProtocolError):
    """The local application asked for something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of place.

    When raised by :meth:`Connection.receive_data` the connection is broken and
    a ``GOODBYE`` carrying :attr:`error_code` has been queued for the peer.
    """


class FlowControlError(LocalProtocolError):
    """A send would exceed the credit the peer has granted."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.FLOW_CONTROL_ERROR)


class FrameTooLargeError(LocalProtocolError):
    """A frame would exceed the size the peer accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.FRAME_SIZE_ERROR)


class StreamAborted(TunnelError):
    """A stream was aborted, by the peer or locally, with a code and a reason."""

    def __init__(self, error_code: int, reason: str, *, remote: bool) -> None:
        who = "peer" if remote else "local side"
        super().__init__(f"stream aborted by {who}: {ErrorCode.name_of(error_code)}: {reason}")
        self.error_code = error_code
        self.reason = reason
        self.remote = remote


class ConnectionLost(TunnelError):
    """The connection failed or was closed before the operation completed."""


class RPCError(TunnelError):
    """A remote procedure call failed; carries the code and message of the peer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{ErrorCode.name_of(code)}: {message}")
        self.code = code
        self.message = message
