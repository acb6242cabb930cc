"""A model folder of safetensors shards, memory-mapped: config, tensor index, row reads."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from lowmem_crosslora.architectures import Family, ModelDims, family_for, fused_rows, model_dims
from lowmem_crosslora.dtypes import TAG_BYTES
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io import hashing
from lowmem_crosslora.io.hub import resolve
from lowmem_crosslora.io.reader import TensorInfo, model_identity, read_json
from lowmem_crosslora.sysmem import host_file_bytes

if TYPE_CHECKING:
    from lowmem_crosslora.io.hashing import HashMemo


def read_safetensors_header(path: Path, what: str) -> dict[str, Any]:
    """Parse a safetensors header without mapping the data, checking it fits the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{what}: {path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise InputError(f"{what}: {path} is not a valid safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise InputError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{what}: {path} is not a valid safetensors file (corrupt header)") from None
    if not isinstance(header, dict):
        raise InputError(f"{what}: {path} is not a valid safetensors file (corrupt header)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
            nbytes = count * TAG_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{what}: {path} has a corrupt entry for tensor {name!r}") from None
        if stop - begin != nbytes or begin < 0:
            raise InputError(f"{what}: {path} has a corrupt entry for tensor {name!r}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise InputError(f"{what}: {path} is truncated ({size} bytes, header needs {8 + n + end})")
    return header


@dataclass(frozen=True)
class View:
    """Rows of a stored tensor's logical (out x in) matrix: one part of a fused module, or a whole
    Conv1D weight (stored in x out, so `transpose`)."""

    real: str
    rows: tuple[tuple[int, int], ...]
    transpose: bool

    def real_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The stored rows (columns when transposed) behind the view's rows [start, stop)."""
        out = []
        offset = 0
        for a, b in self.rows:
            lo, hi = max(start, offset), min(stop, offset + b - a)
            if lo < hi:
                out.append((a + lo - offset, a + hi - offset))
            offset += b - a
        return out


class Checkpoint:
    """A model folder: config.json plus model.safetensors or sharded safetensors with an index."""

    def __init__(self, path: str | os.PathLike[str], role: str = "model") -> None:

        self.given = os.fspath(path)
        self.path = resolve(path, role)
        self.role = role
        where = f"{role} {self.path}"
        if not self.path.exists():
            raise InputError(f"{where}: no such file or directory")
        if not self.path.is_dir():
            raise InputError(f"{where}: expected a model folder (config.json plus *.safetensors)")
        self.config = read_json(self.path / "config.json", role)
        self.family: Family = family_for(self.config, where)
        self.dims: ModelDims = model_dims(self.config, self.family, where)
        self.tensors: dict[str, TensorInfo] = {}
        self._headers: dict[Path, dict[str, Any]] = {}
        self._open: dict[Path, Any] = {}
        self._data_start: dict[Path, int] = {}
        for file in self._weight_files(where):
            header = read_safetensors_header(file, role)
            self._headers[file] = header
            for name, info in header.items():
                if name != "__metadata__":
                    self.tensors[name] = TensorInfo(name, file, tuple(int(d) for d in info["shape"]), info["dtype"])
        self.layer_prefix = self._find_layer_prefix(where)
        self.views: dict[str, View] = {}
        self._real_hashes: dict[str, str] = {}
        self._build_views(where)

    def _weight_files(self, where: str) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = read_json(index, self.role).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{where}: {index.name} has no weight_map")
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise InputError(f"{where}: shard {f.name} named in {index.name} is missing")
            return files
        if single.exists():
            return [single]
        others = sorted(self.path.glob("*.safetensors"))
        if others:
            return others
        pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise InputError(
                f"{where}: only pickled weights ({', '.join(pickled[:3])}) found; convert them to safetensors first "
                "(pickle files can run code when loaded, so they are never opened here)"
            )
        raise InputError(f"{where}: no model.safetensors or model.safetensors.index.json found")

    def _find_layer_prefix(self, where: str) -> str:
        for prefix in self.family.layer_prefixes:
            probe = f"{prefix}.0.{self.family.modules['q']}.weight"
            if probe in self.tensors:
                return prefix
        raise InputError(f"{where}: no decoder layer weights found (looked for e.g. model.layers.0.self_attn.q_proj.weight)")

    def _build_views(self, where: str) -> None:
        fam = self.family
        if not fam.fused and not fam.conv1d:
            return
        for layer in range(self.dims.num_layers):
            for module, path in fam.modules.items():
                real = f"{self.layer_prefix}.{layer}.{path}.weight"
                info = self.tensors.get(real)
                if info is None or len(info.shape) != 2:
                    continue
                out_rows = info.shape[1] if fam.conv1d else info.shape[0]
                if path in fam.fused:
                    rows, total = fused_rows(fam, self.dims, path)
                    if out_rows != total:
                        parts = "+".join(fam.fused[path].parts)
                        raise InputError(f"{where}: fused weight {real} has {out_rows} output rows, but config.json implies {total} ({parts})")
                    self.views[f"{real}#{module}"] = View(real, tuple(rows[module]), fam.conv1d)
                elif fam.conv1d:
                    self.views[f"{real}#T"] = View(real, ((0, out_rows),), True)

    def weight_name(self, layer: int, module: str) -> str:
        """The name of a canonical module's (out x in) weight: a tensor's, or a view's (see View)."""
        path = self.family.modules.get(module)
        if path is None:  # the family has no such module (gpt2 and gpt_neox have no gate): has() is False
            return f"{self.layer_prefix}.{layer}.<no {module} in {self.family.name}>.weight"
        real = f"{self.layer_prefix}.{layer}.{path}.weight"
        if path in self.family.fused:
            return f"{real}#{module}"
        return f"{real}#T" if self.family.conv1d else real

    def has(self, name: str) -> bool:
        return name in self.tensors or name in self.views

    def info(self, name: str) -> TensorInfo:
        view = self.views.get(name)
        if view is not None:
            real = self.tensors[view.real]
            cols = real.shape[0] if view.transpose else real.shape[1]
            return TensorInfo(name, real.file, (sum(b - a for a, b in view.rows), cols), real.dtype)
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.role} {self.path}: tensor {name} not found") from None

    def _read_view(self, view: View, start: int, stop: int) -> torch.Tensor:
        info = self.tensors[view.real]
        try:
            sl = self._handle(info.file).get_slice(view.real)
            parts = [sl[:, a:b].T if view.transpose else sl[a:b] for a, b in view.real_ranges(start, stop)]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"{self.role}: cannot read tensor {view.real} from {info.file}: {e}") from None
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out.contiguous()

    def _handle(self, file: Path) -> Any:
        h = self._open.get(file)
        if h is None:
            try:
                h = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise InputError(f"{self.role}: cannot open {file}: {e}") from None
            self._open[file] = h
        return h

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor (or view) in its stored dtype."""
        view = self.views.get(name)
        if view is not None:
            return self._read_view(view, 0, self.info(name).shape[0])
        info = self.info(name)
        try:
            return self._handle(info.file).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"{self.role}: cannot read tensor {name} from {info.file}: {e}") from None

    def advise(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes into the page cache (no-op where
        posix_fadvise is missing). Nothing is mapped or copied: it only overlaps disk with compute."""
        if name in self.views:
            name = self.views[name].real
        info = self.info(name)
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        header = self._headers[info.file]
        begin, end = header[name]["data_offsets"]
        start = self._data_offset(info.file)
        try:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                advise(fd, start + begin, end - begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _data_offset(self, file: Path) -> int:
        start = self._data_start.get(file)
        if start is None:
            with open(file, "rb") as f:
                start = 8 + struct.unpack("<Q", f.read(8))[0]
            self._data_start[file] = start
        return start

    def content_hash(self, name: str, memo: HashMemo | None = None) -> str:
        """BLAKE2b-256 of a tensor's bytes as stored (the basis cache's content key), read once
        through a memory map; the pages stay in the page cache for the read that may follow.
        `memo` remembers hashes of unchanged files between runs (see cache.HashMemo)."""

        view = self.views.get(name)
        if view is not None:  # the stored tensor's hash, plus which of its rows the view takes
            real = self._real_hashes.get(view.real)
            if real is None:
                real = self._real_hashes[view.real] = self.content_hash(view.real, memo)
            key = json.dumps([real, list(map(list, view.rows)), view.transpose]).encode()
            return hashlib.blake2b(key, digest_size=32).hexdigest()
        info = self.info(name)
        begin, end = self._headers[info.file][name]["data_offsets"]
        try:
            offset = self._data_offset(info.file) + begin
            known = memo.get(info.file, offset, end - begin) if memo is not None else None
            if known is not None:
                return known
            h = hashing.content_hash(info.file, offset, end - begin)
            if memo is not None:
                memo.put(info.file, offset, end - begin, h)
            return h
        except (OSError, ValueError) as e:
            raise InputError(f"{self.role}: cannot read tensor {name} from {info.file}: {e}") from None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor (or view) in its stored dtype, read from the map."""
        view = self.views.get(name)
        if view is not None:
            return self._read_view(view, start, stop)
        info = self.info(name)
        try:
            return self._handle(info.file).get_slice(name)[start:stop]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"{self.role}: cannot read tensor {name} from {info.file}: {e}") from None

    def identity(self) -> str:
        """What the model is, independent of where and how it lies: config plus every tensor's
        name, dtype and shape.

        This keys the random seeds, so a copy of a model in another folder, or the same weights
        saved as one file or as shards, gives the same bytes (file names and offsets are left out).
        """
        return model_identity(self.config, self.tensors)

    def fingerprint(self) -> str:
        """Identity plus each shard's size and modification time: any rewrite of a weight file shows."""
        h = hashlib.sha256(self.identity().encode())
        for file in sorted(self._headers):
            st = file.stat()
            h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:32]

    def close(self) -> None:
        """Drop the open maps. Tensors already read keep their own pages until they are freed."""
        self._open.clear()

    def release_pages(self, limit: int) -> None:
        """Unmap the shards once this process holds more than `limit` bytes of mapped file pages,
        so the pages of tensors already factored stop counting as this process's resident memory.
        (Reopening a shard costs milliseconds, so this is done only past the limit.)"""

        if self._open and host_file_bytes() > limit:
            self._open.clear()
