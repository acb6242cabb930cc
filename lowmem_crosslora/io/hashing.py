"""Content hashes of stored tensors, memoised per file identity."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import threading
from pathlib import Path

from lowmem_crosslora.io.runstate import atomic_write


def content_hash(path: Path, offset: int, length: int, chunk: int = 16 << 20) -> str:
    """BLAKE2b-256 of `length` bytes of a file from `offset`, read through a memory map (the pages
    land in the page cache, so the engine's own read that may follow costs no second disk read)."""

    h = hashlib.blake2b(digest_size=32)
    if length == 0:
        return h.hexdigest()
    with open(path, "rb") as f:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(f.fileno(), length + offset - start, access=mmap.ACCESS_READ, offset=start) as mm:
            view = memoryview(mm)
            try:
                base = offset - start
                for s in range(0, length, chunk):
                    h.update(view[base + s : base + min(length, s + chunk)])
            finally:
                view.release()
    return h.hexdigest()


MEMO_SCHEMA = "lowmem-crosslora/hash-memo/1"


MEMO_DIR = "hashes"


def file_identity(path: Path) -> list[int]:
    """What says a file is unchanged: device, inode, size, and modification and change times in
    nanoseconds (the change time moves on any write or metadata change and cannot be set back)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashMemo:
    """Content hashes of base-weight files already hashed, so that a warm transfer does not read
    every weight just to find its cache entries (hashing a 3B model's layers is seconds of work).

    One small JSON file per weight file, in the cache folder's `hashes/`, holding the file's
    identity (file_identity) and the hashes of byte spans of it. A memo is trusted only while the
    file's identity is unchanged: any write to the file, a copy, a move to another disk, changes
    it and the span is hashed again. Thread-safe (the engine may hash ahead on a thread)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / MEMO_DIR
        self._lock = threading.Lock()
        self._files: dict[str, tuple[list[int], dict[str, str]]] = {}
        self._dirty: set[str] = set()
        self.writable = True

    def _memo_path(self, real: str) -> Path:
        return self.dir / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")

    def _load(self, real: str, ident: list[int]) -> dict[str, str]:
        entry = self._files.get(real)
        if entry is not None and entry[0] == ident:
            return entry[1]
        spans: dict[str, str] = {}
        try:
            doc = json.loads(self._memo_path(real).read_text(encoding="utf-8"))
            if doc.get("schema") == MEMO_SCHEMA and doc.get("file") == real and doc.get("identity") == ident:
                spans = {str(k): str(v) for k, v in doc.get("spans", {}).items()}
        except (OSError, ValueError, AttributeError):
            pass
        self._files[real] = (ident, spans)
        return spans

    def get(self, path: Path, offset: int, length: int) -> str | None:
        real = os.path.realpath(path)
        ident = file_identity(Path(real))
        with self._lock:
            return self._load(real, ident).get(f"{offset}:{length}")

    def put(self, path: Path, offset: int, length: int, digest: str) -> None:
        real = os.path.realpath(path)
        ident = file_identity(Path(real))
        with self._lock:
            self._load(real, ident)[f"{offset}:{length}"] = digest
            self._dirty.add(real)

    def save(self) -> None:
        """Write the memos that changed (atomically; failure only costs a rehash next time)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            if not self.writable:
                return
            for real in sorted(dirty):
                ident, spans = self._files[real]
                doc = {"schema": MEMO_SCHEMA, "file": real, "identity": ident, "spans": dict(sorted(spans.items()))}
                try:
                    atomic_write(self._memo_path(real), json.dumps(doc, sort_keys=True).encode(), durable=False)
                except OSError:
                    self.writable = False
                    return

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
            self._dirty.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
