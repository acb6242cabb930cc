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
optimisation: any failure to read or write it is a warning, never a reason for a transfer to fail."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from lowmem_crosslora.dtypes import NAME_TAG, TAG_TORCH, TORCH_TAG
from lowmem_crosslora.io.hashing import HashMemo
from lowmem_crosslora.io.runstate import atomic_write
from lowmem_crosslora.linalg.bases import Basis

DEFAULT_LIMIT = 20 * 1000**3


SCHEMA = "lowmem-crosslora/basis-cache/1"


SUFFIX = ".safetensors"


_DTYPES = {t: TAG_TORCH[t] for t in ("F32", "F64")}  # what cache entries are stored in


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
            if info["shape"] != shape or TORCH_TAG[dtype] != key_dtype_tag(key):
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
    return NAME_TAG[key.compute_dtype]
