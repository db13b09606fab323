"""A persistent text-embedding cache on disk, shared by every process of a user.

Each entry is one small safetensors file named by the SHA-256 of its key (weights hash,
precision, and a digest of the token ids of the text's prompts, so any tokenizer is keyed by
what it produced), with the key itself in its metadata: a corrupt file or
one whose key differs (a hash collision, another format) is ignored and rewritten. Files are
written under a temporary name and renamed, so concurrent writers never leave a partial entry.
The folder is bounded: past ``max_bytes`` the least recently used entries are removed.

Where: ``$CLIP_SURGERY_CACHE`` (``off`` turns the cache off), else the user's cache folder
(``platformdirs``: ``~/.cache/clip-surgery`` on Linux).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .outputs import atomic_path

ENVIRONMENT = "CLIP_SURGERY_CACHE"
FORMAT = "clip-surgery-text-1"
DEFAULT_MAX_BYTES = 256 * 2**20
_OFF = {"off", "0", "none", "false", "no"}


def default_directory() -> Path | None:
    """``$CLIP_SURGERY_CACHE`` (None when it says ``off``), else the platform's user cache."""
    value = os.environ.get(ENVIRONMENT)
    if value is not None and value.strip():
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("clip-surgery", appauthor=False))


def entry_key(*parts) -> str:
    """The canonical key text of an entry (JSON of its parts)."""
    return json.dumps([FORMAT, *parts], ensure_ascii=False, separators=(",", ":"))


class TextEmbeddingCache:
    """Text embeddings on disk under ``directory/text``; ``get`` misses on anything unusable."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.directory / "text" / digest[:2] / f"{digest}.safetensors"

    def get(self, key: str) -> np.ndarray | None:
        """The stored float32 vector of ``key``, or None (missing, corrupt or foreign)."""
        from safetensors import safe_open

        path = self._path(key)
        try:
            with safe_open(str(path), framework="numpy") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    return None
                vector = handle.get_tensor("embedding")
        except Exception:  # missing, truncated, not safetensors: a miss, rewritten later
            return None
        if vector.ndim != 1 or vector.dtype != np.float32 or not np.isfinite(vector).all():
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept longest
        return vector

    def put(self, entries: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store vectors atomically; then evict the oldest entries if the folder is too big."""
        from safetensors.numpy import save

        wrote = False
        for key, vector in entries:
            data = save(
                {"embedding": np.ascontiguousarray(vector, dtype=np.float32)},
                metadata={"key": key},
            )
            try:
                with atomic_path(self._path(key)) as temporary:
                    temporary.write_bytes(data)
                wrote = True
            except OSError:  # a read-only or full cache never stops the work
                return
        if wrote:
            self.evict()

    def evict(self) -> None:
        """Remove least recently used entries until the folder is under 80% of ``max_bytes``."""
        files = []
        for path in (self.directory / "text").glob("*/*.safetensors"):
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        if total <= self.max_bytes:
            return
        for _, size, path in sorted(files):
            path.unlink(missing_ok=True)
            total -= size
            if total <= 0.8 * self.max_bytes:
                break

    def file_hash(self, paths: list[Path], compute) -> str:
        """``compute()`` for weights files, remembered by their paths, sizes and mtimes."""
        stats = [(path.resolve(), path.stat()) for path in paths]
        identity = ";".join(f"{p}|{s.st_size}|{s.st_mtime_ns}" for p, s in stats)
        digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()
        record = self.directory / "weights" / f"{digest}.json"
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
            if stored.get("file") == identity and isinstance(stored.get("sha256"), str):
                return stored["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
        value = compute()
        try:
            with atomic_path(record) as temporary:
                temporary.write_text(json.dumps({"file": identity, "sha256": value}))
        except OSError:
            pass
        return value
