"""The connection preface and the settings each side declares at handshake.

Each side sends the 8-byte preface (magic ``TUNL``, lowest and highest
protocol version it speaks) and then one ``SETTINGS`` frame.  Settings are
receive-side limits: each value says what the *sender of the settings* will
accept, and binds the peer when it sends.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum, IntFlag

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._frametypes import MAX_WINDOW, SettingsFrame

__all__ = [
    "MAGIC",
    "PREFACE",
    "PROTOCOL_VERSION",
    "ZSTD_MAX_EXPANSION",
    "Feature",
    "SettingId",
    "Settings",
    "negotiate_version",
]

MAGIC = b"TUNL"
PREFACE = struct.Struct(">4sHH")  # magic, min version, max version
PROTOCOL_VERSION = 1

MIN_FRAME_SIZE = 16 * 1024
MAX_FRAME_SIZE = 16 * 1024 * 1024
#: A ZSTD_PAGES frame stands for at most this many times the receiver's
#: MAX_FRAME_SIZE of page data: what a receiver must be ready to allocate for
#: one decompressed frame is bounded by its own setting, not by the sender.
ZSTD_MAX_EXPANSION = 64


class SettingId(IntEnum):
    MAX_FRAME_SIZE = 1
    INITIAL_STREAM_WINDOW = 2
    CONNECTION_WINDOW = 3
    MAX_CONCURRENT_STREAMS = 4
    MAX_CONCURRENT_CALLS = 5
    MAX_CALL_SIZE = 6
    FEATURES = 7


class Feature(IntFlag):
    """Optional features; one is on only when both sides set its bit."""

    NONE = 0
    DIGEST_SHA256 = 0x1  # the peer can verify SHA-256 end-of-stream digests
    ZSTD = 0x2  # the peer accepts ZSTD_PAGES (zstd-compressed page data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """What this side accepts from its peer.  Defaults suit a 2 GB/s link."""

    #: Largest frame payload (bytes) this side accepts; 16 KiB .. 16 MiB.
    max_frame_size: int = 1024 * 1024
    #: Credit the peer starts with on each stream, per direction.
    initial_stream_window: int = 4 * 1024 * 1024
    #: Credit the peer starts with for all streams together.
    connection_window: int = 16 * 1024 * 1024
    #: Streams the peer may have open towards this side at once.
    max_concurrent_streams: int = 128
    #: RPC calls from the peer this side will run at once; more get BUSY.
    max_concurrent_calls: int = 128
    #: Largest RPC call body this side accepts; larger calls get CALL_TOO_LARGE.
    max_call_size: int = 1024 * 1024 - 64
    features: int = Feature.DIGEST_SHA256

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise LocalProtocolError(problem)

    def problem(self) -> str | None:
        """Why these values are invalid, or None."""
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE:
            return f"max_frame_size {self.max_frame_size} outside {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}"
        for name in ("initial_stream_window", "connection_window"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_WINDOW:
                return f"{name} {value} outside 0..2**31-1"
        if not 0 <= self.max_concurrent_streams <= 0xFFFFFFFF:
            return f"max_concurrent_streams {self.max_concurrent_streams} does not fit in 32 bits"
        if not 0 <= self.max_concurrent_calls <= 0xFFFFFFFF:
            return f"max_concurrent_calls {self.max_concurrent_calls} does not fit in 32 bits"
        if not 0 <= self.max_call_size <= 0xFFFFFFFF:
            return f"max_call_size {self.max_call_size} does not fit in 32 bits"
        if not 0 <= self.features <= 0xFFFFFFFF:
            return f"features {self.features} does not fit in 32 bits"
        return None

    def to_frame(self) -> SettingsFrame:
        return SettingsFrame(settings=tuple((int(SettingId[f.name.upper()]), int(getattr(self, f.name))) for f in fields(self)))

    @classmethod
    def from_frame(cls, frame: SettingsFrame) -> Settings:
        """Peer settings from its SETTINGS frame; unknown ids are ignored."""
        values: dict[str, int] = {}
        seen: set[int] = set()
        for ident, value in frame.settings:
            if ident in seen:
                raise RemoteProtocolError(f"setting {ident} given twice")
            seen.add(ident)
            try:
                values[SettingId(ident).name.lower()] = value
            except ValueError:
                continue  # unknown settings are ignored, for extensibility
        try:
            return cls(**values)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"peer settings invalid: {exc.reason}") from None


def negotiate_version(
    local_min: int, local_max: int, peer_min: int, peer_max: int
) -> int:
    """The highest version both ranges contain, or RemoteProtocolError."""
    version = min(local_max, peer_max)
    if peer_min > peer_max or version < max(local_min, peer_min):
        raise RemoteProtocolError(
            f"no common protocol version: peer speaks {peer_min}..{peer_max}, "
            f"this side speaks {local_min}..{local_max}",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    return version
