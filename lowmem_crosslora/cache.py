"""A persistent cache of truncated SVD factors of base-model weights.

The SVDs of the base models dominate a transfer's cost and depend only on the base models, so the
factors are kept between runs, keyed by what determines their bytes:

- the content of the weight: a BLAKE2b digest of the tensor's bytes as stored, with its dtype and
  shape (a copy of the model elsewhere, or resharded, hits the same entries);
- the method the engine would use for it (which depends on r, the SVD settings and the device) and
  the compute dtype;
- for the randomized range finder (also at full width): r, q, niter, the derived seed (which mixes
  the model's identity, the tensor name, r and --seed) and the device type whose generator drew the
  test matrix. Its entries are used only at exactly that r: the leading r columns of a rank-R
  randomized basis are not the rank-r randomized basis, bit for bit.
- for the exact SVD (LAPACK, on the CPU): nothing else. Its leading r singular triplets do not
  depend on how many were kept, so an entry stored at rank R serves any r <= R by truncation,
  byte-identically (`lowmem-crosslora bases` relies on that).

Entries are safetensors files (U, S, V in the compute dtype, metadata with the key, the method, the
shape, the tensor's last known name and a SHA-256 of the tensor payload), written atomically (a
temporary file in the same folder, fsync, os.replace) and verified on every read: an entry that
does not parse, whose checksum or key does not match, or whose shapes are wrong is deleted and
recomputed, never trusted. A size limit is enforced after each write by evicting the least
recently used entries (an entry's modification time is touched on every hit). The cache is an
optimisation: any failure to read or write it is a warning, never a reason for a transfer to fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .bases import Basis
from .output import fsync_dir

DEFAULT_LIMIT = 20 * 1000**3
SCHEMA = "lowmem-crosslora/basis-cache/1"
SUFFIX = ".safetensors"
_DTYPES = {"F32": torch.float32, "F64": torch.float64}
_DTYPE_TAGS = {v: k for k, v in _DTYPES.items()}


def default_cache_dir() -> Path:
    """The platform's place for user caches: $XDG_CACHE_HOME or ~/.cache on Linux and other
    Unixes, ~/Library/Caches on macOS, %LOCALAPPDATA%\\lowmem-crosslora\\Cache on Windows."""
    env = os.environ.get("LOWMEM_CROSSLORA_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "lowmem-crosslora" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "lowmem-crosslora"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "lowmem-crosslora"


def content_hash(path: Path, offset: int, length: int, chunk: int = 16 << 20) -> str:
    """BLAKE2b-256 of `length` bytes of a file from `offset`, read through a memory map (the pages
    land in the page cache, so the engine's own read that may follow costs no second disk read)."""
    import mmap

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


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same folder and one rename, so that a
    reader sees the old file or the whole new one; `durable` also fsyncs the file and the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


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


@dataclass(frozen=True)
class CacheKey:
    """What determines a basis's bytes (see the module's notes)."""

    content: str  # BLAKE2b-256 of the stored bytes
    dtype: str  # stored dtype tag
    shape: tuple[int, int]
    method: str  # "exact" or "randomized"
    compute_dtype: str
    r: int = 0  # randomized only: the rank
    q: int = 0
    niter: int = 0
    seed: int = 0
    device_type: str = ""

    def fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA, "content": self.content, "dtype": self.dtype, "shape": list(self.shape)}
        d.update(method=self.method, compute_dtype=self.compute_dtype)
        if self.method != "exact":
            d.update(r=self.r, q=self.q, niter=self.niter, seed=self.seed, device_type=self.device_type)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:40]


@dataclass
class EntryInfo:
    path: Path
    size: int
    last_used: float
    meta: dict[str, Any]


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 1 << 20:
            raise ValueError("header too large")
        return json.loads(f.read(n))


class BasisCache:
    """One cache folder. `warn` receives one line per problem (the first time it happens)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, limit: int | None = None, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.limit = DEFAULT_LIMIT if limit is None else int(limit)
        self.warn = warn or (lambda msg: None)
        self.writable = True
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.rejected = 0
        self.evicted = 0
        self.warnings: list[str] = []
        self._total: int | None = None
        self.memo = HashMemo(self.root)
        self._lock = threading.Lock()

    # ---- reporting --------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        """Entries are read on read-ahead threads: counters move under a lock."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
            self.warn(msg)

    def stats(self) -> dict[str, Any]:
        return {
            "dir": str(self.root),
            "hits": self.hits,
            "misses": self.misses,
            "stored": self.stored,
            "rejected": self.rejected,
            "evicted": self.evicted,
            "warnings": list(self.warnings),
        }

    def path_for(self, key: CacheKey) -> Path:
        return self.root / (key.digest() + SUFFIX)

    # ---- reading ----------------------------------------------------------------------------
    def entry_bytes(self, key: CacheKey) -> int | None:
        """Size of the entry for `key` if there is one (a cheap check, nothing is verified)."""
        try:
            return self.path_for(key).stat().st_size
        except OSError:
            return None

    def get(self, key: CacheKey, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None:
        """(U[:, :r], S[:r], V[:, :r], method) from a verified entry, or None. A damaged or
        mismatching entry is deleted (with a warning) and None returned."""
        path = self.path_for(key)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = bytearray(size)
                if f.readinto(data) != size:
                    data = data[: f.tell()]  # shrank under us: verification rejects it
        except FileNotFoundError:
            self._count("misses")
            return None
        except OSError as e:
            self._count("misses")
            self._warn(f"basis cache: cannot read {path} ({e.strerror or e}); computing the basis instead")
            return None
        try:
            got = self._parse(data, key, r)
        except (ValueError, KeyError, TypeError, RuntimeError, struct.error, json.JSONDecodeError) as e:
            self._count("misses")
            self._count("rejected")
            self._warn(f"basis cache: entry {path.name} failed verification ({e}); deleted, the basis is recomputed")
            self._remove(path)
            return None
        if got is None:  # a valid exact entry of a smaller rank: recomputed and replaced
            self._count("misses")
            return None
        self._count("hits")
        try:
            os.utime(path)  # last used, for the LRU eviction
        except OSError:
            pass
        return got

    def _parse(self, data: bytearray, key: CacheKey, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None:
        if len(data) < 8:
            raise ValueError("truncated")
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        if n > min(len(data) - 8, 1 << 20):
            raise ValueError("truncated or corrupt header")
        header = json.loads(bytes(data[8 : 8 + n]))
        meta = header.get("__metadata__") or {}
        payload = memoryview(data)[8 + n :]
        if json.loads(meta["key"]) != key.fields():
            raise ValueError("key mismatch")
        m, ncols = key.shape
        stored_r = int(meta["r"])
        if key.method != "exact" and stored_r != key.r:
            raise ValueError("rank mismatch")
        if stored_r < r:
            return None
        want = {"U": [m, stored_r], "S": [stored_r], "V": [ncols, stored_r]}
        out: dict[str, torch.Tensor] = {}
        check = hashlib.sha256()
        for name, shape in want.items():
            info = header[name]
            dtype = _DTYPES[info["dtype"]]
            if info["shape"] != shape or _DTYPE_TAGS[dtype] != key_dtype_tag(key):
                raise ValueError(f"tensor {name} has the wrong shape or dtype")
            begin, end = info["data_offsets"]
            count = 1
            for d in shape:
                count *= d
            if end - begin != count * dtype.itemsize or end > len(payload):
                raise ValueError(f"tensor {name} has corrupt offsets")
            check.update(payload[begin:end])
            out[name] = torch.frombuffer(payload, dtype=dtype, count=count, offset=begin).reshape(shape)
        if meta.get("payload_sha256") != check.hexdigest():
            raise ValueError("checksum mismatch")
        U, S, V = out["U"], out["S"], out["V"]
        if not bool(torch.isfinite(S).all()):
            raise ValueError("non-finite singular values")
        method = str(meta.get("method", key.method))
        if stored_r == r:  # views of the buffer, which they keep alive (no copy)
            return U, S, V, method
        return U[:, :r].contiguous(), S[:r].clone(), V[:, :r].contiguous(), method

    # ---- writing ----------------------------------------------------------------------------
    def put(self, key: CacheKey, basis: Basis, name: str = "", model: str = "") -> None:
        """Store a basis (atomically); evict least recently used entries past the size limit."""
        if not self.writable:
            return
        path = self.path_for(key)
        U, S, V = (t.detach().to("cpu").contiguous() for t in (basis.U, basis.S, basis.V))
        tensors = {"U": U, "S": S, "V": V}
        meta = {
            "key": json.dumps(key.fields(), sort_keys=True),
            "method": basis.method,
            "r": str(int(S.shape[0])),
            "shape": json.dumps(list(key.shape)),
            "tensor": name,
            "model": model,
            "created": f"{time.time():.3f}",
        }
        # The checksum covers the tensors' bytes, U then S then V.
        check = hashlib.sha256()
        for t in (U, S, V):
            check.update(t.numpy().data.cast("B") if t.numel() else b"")
        meta["payload_sha256"] = check.hexdigest()
        raw = save(tensors, metadata=meta)
        try:
            atomic_write(path, raw)
        except OSError as e:
            self.writable = False
            self._warn(f"basis cache: cannot write to {self.root} ({e.strerror or e}); continuing without storing bases")
            return
        self.stored += 1
        if self._total is None:
            self._total = sum(e.size for e in self.entries())
        else:
            self._total += len(raw)
        if self._total > self.limit:
            self.evicted += len(self.prune(self.limit, keep=path))

    # ---- housekeeping -------------------------------------------------------------------------
    def entries(self) -> list[EntryInfo]:
        """Every entry, least recently used first (temporary files of unfinished writes are skipped)."""
        out = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            p = self.root / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append(EntryInfo(p, st.st_size, st.st_mtime, {}))
        out.sort(key=lambda e: (e.last_used, e.path.name))
        return out

    def describe(self, e: EntryInfo) -> dict[str, Any]:
        try:
            meta = _header(e.path).get("__metadata__") or {}
            key = json.loads(meta.get("key", "{}"))
        except (OSError, ValueError, struct.error):
            meta, key = {}, {}
        return {
            "file": e.path.name,
            "tensor": meta.get("tensor") or None,
            "model": meta.get("model") or None,
            "shape": key.get("shape"),
            "dtype": key.get("dtype"),
            "r": int(meta["r"]) if meta.get("r", "").isdigit() else None,
            "method": meta.get("method"),
            "device_type": key.get("device_type") or None,
            "size": e.size,
            "last_used": e.last_used,
        }

    def prune(self, max_size: int, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the total is at most max_size (the entry
        `keep` goes last). Also removes temporary files left by writes that died."""
        now = time.time()
        try:
            for name in os.listdir(self.root):
                if name.startswith(".tmp-"):
                    p = self.root / name
                    try:
                        if now - p.stat().st_mtime > 3600:
                            p.unlink()
                    except OSError:
                        pass
        except OSError:
            return []
        items = self.entries()
        if keep is not None:
            items.sort(key=lambda e: e.path == keep)  # stable: LRU order otherwise kept
        total = sum(e.size for e in items)
        removed = []
        for e in items:
            if total <= max_size:
                break
            if self._remove(e.path):
                removed.append(e.path)
                total -= e.size
        self._total = total
        return removed

    def clear(self) -> int:
        n = 0
        for e in self.entries():
            n += self._remove(e.path)
        self._total = 0
        self.memo.clear()
        return n

    def _remove(self, path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            self._warn(f"basis cache: cannot delete {path} ({e.strerror or e})")
            return False


def key_dtype_tag(key: CacheKey) -> str:
    return {"float32": "F32", "float64": "F64"}[key.compute_dtype]
