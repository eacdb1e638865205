"""Content-addressed cache of model calls: request hash → response, one small file per entry.

The key is the SHA-256 of the endpoint's base URL and the canonical request body (model,
messages, tools, temperature, seed, max_tokens: exactly the bytes sent), so any change to the
request is a miss and the same request is a hit in any later process. An entry is written to a
temporary file and renamed into place (`os.replace` is atomic on POSIX), so a process killed
mid-write (SIGKILL included) leaves either the whole entry or none, never a torn one. Several
processes may share one folder. Only successful responses are stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

_SUFFIX = ".json"


class ModelCache:
    """A folder of cached model responses, safe across processes and crashes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._dirs: set[str] = set()

    @staticmethod
    def key(namespace: str, body: bytes) -> str:
        """The entry key for a request body sent to an endpoint.

        Args:
            namespace: what besides the body decides the answer (the endpoint's base URL).
            body: the canonical JSON request body, as sent.

        Returns:
            A 64-character hex digest.
        """
        h = hashlib.sha256(namespace.encode())
        h.update(b"\n")
        h.update(body)
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key[2:]}{_SUFFIX}"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None when absent or unreadable (an unreadable one is a miss)."""
        try:
            data = json.loads(self._path(key).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Store an entry atomically (temporary file, then rename)."""
        shard = key[:2]
        folder = self.root / shard
        if shard not in self._dirs:
            folder.mkdir(exist_ok=True)
            self._dirs.add(shard)
        tmp = folder / f".{key[2:]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode())
        os.replace(tmp, self._path(key))

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob(f"??/*{_SUFFIX}"))
