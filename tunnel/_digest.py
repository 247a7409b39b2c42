"""Running end-of-stream digests over the flow-controlled payload of one direction."""

from __future__ import annotations

import hashlib
import zlib

from ._frames import Buffer, DigestAlgorithm

__all__ = ["RunningDigest"]


class RunningDigest:
    """Counts payload bytes and folds them into the stream's digest."""

    __slots__ = ("_crc", "_sha", "algorithm", "total")

    def __init__(self, algorithm: int) -> None:
        self.algorithm = DigestAlgorithm(algorithm)
        self.total = 0
        self._crc = 0
        self._sha = hashlib.sha256() if self.algorithm is DigestAlgorithm.SHA256 else None

    def update(self, data: Buffer) -> None:
        self.total += len(data)
        if self.algorithm is DigestAlgorithm.CRC32:
            self._crc = zlib.crc32(data, self._crc)
        elif self._sha is not None:
            self._sha.update(data)

    def skip(self, size: int) -> None:
        """Bytes that bypassed this process (spliced): counted, not hashed."""
        self.total += size

    def digest(self) -> bytes:
        if self.algorithm is DigestAlgorithm.CRC32:
            return self._crc.to_bytes(4, "big")
        if self._sha is not None:
            return self._sha.digest()
        return b""
