"""A GGUF base model (llama.cpp's single-file format) behind the same interface as Checkpoint.

The engine never learns where a tensor comes from: this class exposes the model under Hugging Face
names (model.layers.N.self_attn.q_proj.weight, ...) in torch layout (out x in), with a config
built from the GGUF metadata, and reads one tensor, or one block of its rows, at a time from a
memory map, dequantized to float32 (F32, F16 and BF16 are returned as stored, without a copy).

llama.cpp's converter permutes the rows of q and k of llama-family models (its rope kernel wants
the two halves of each head interleaved); that permutation is undone here, exactly as transformers'
own GGUF loader does (modeling_gguf_pytorch_utils.LlamaTensorProcessor._reverse_permute_weights),
so that bases and adapters line up with the Hugging Face layout the PEFT adapter was trained on.

The header is parsed here (a few lines of struct, skipping the tokenizer's arrays) rather than by
gguf.GGUFReader, which builds a Python object per vocabulary string (seconds for a 150k vocab);
the `gguf` package supplies the type tables and the dequantization kernels.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lowmem_crosslora.architectures import Family, ModelDims, family_for, model_dims
from lowmem_crosslora.dtypes import PLAIN
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io import hashing
from lowmem_crosslora.io.reader import TensorInfo, model_identity
from lowmem_crosslora.sysmem import host_file_bytes

if TYPE_CHECKING:
    from lowmem_crosslora.io.hashing import HashMemo

INSTALL_HINT = "reading GGUF files needs the gguf package: pip install 'lowmem-crosslora[gguf]' (or pip install gguf)"

# GGUF general.architecture -> Hugging Face model_type (the family tables' key).
GGUF_ARCH_TO_MODEL_TYPE = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# GGUF architectures whose q and k rows llama.cpp's converter permutes.
PERMUTED_ARCHS = frozenset({"llama"})
# Canonical module -> the GGUF tensor name inside block N (blk.N.<name>.weight).
GGUF_MODULES = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}
# Types read without dequantization (returned in their stored dtype).
# Quantized types whose dequantization is supported (tested ones first).
SUPPORTED_QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
# Bytes of float32 output dequantized per call: gguf's kernels hold every 16-row group's output
# and several temporaries before concatenating, about 3x this, and the read-ahead thread
# dequantizes beside the SVD's peak, so it is kept small (per-call overhead is negligible).
DEQUANT_CHUNK = 256 << 10


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return gguf


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """A file (not a folder) that ends in .gguf or starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ---- the header -------------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: Any, where: str) -> None:
        self.buf = buf
        self.pos = 0
        self.where = where

    def take(self, fmt: str) -> Any:
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise InputError(f"{self.where}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if n > len(self.buf) - self.pos:
            raise InputError(f"{self.where}: corrupt GGUF header (string of {n} bytes)")
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:
                size = struct.calcsize(_SCALARS[itype]) * count
                if size > len(self.buf) - self.pos:
                    raise InputError(f"{self.where}: corrupt GGUF header (array of {count} items)")
                self.pos += size  # arrays (tokenizer scores, token types) are not needed: skipped
            elif itype == _STRING:
                for _ in range(count):
                    n = self.take("<Q")
                    self.pos += n
                    if self.pos > len(self.buf):
                        raise InputError(f"{self.where}: truncated GGUF header")
            else:
                raise InputError(f"{self.where}: unsupported GGUF array item type {itype}")
            return ArrayMeta(count)
        raise InputError(f"{self.where}: corrupt GGUF header (value type {vtype})")


class ArrayMeta:
    """A metadata array, kept only as its length (the tokenizer's vocabulary, scores, merges)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __repr__(self) -> str:
        return f"<array of {self.count}>"


class GGUFTensor:
    __slots__ = ("gguf_name", "ggml_type", "type_name", "shape", "offset", "nbytes", "row_bytes")

    def __init__(self, gguf_name: str, ggml_type: int, type_name: str, shape: tuple[int, ...], offset: int, nbytes: int, row_bytes: int) -> None:
        self.gguf_name = gguf_name
        self.ggml_type = ggml_type
        self.type_name = type_name
        self.shape = shape  # torch / numpy order (the reverse of GGUF's ne)
        self.offset = offset  # absolute, in the file
        self.nbytes = nbytes
        self.row_bytes = row_bytes


def read_gguf_header(path: Path, where: str) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """Metadata (arrays kept only as their length) and tensor table of a GGUF file (versions 2 and 3)."""
    gguf = require_gguf()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cur = _Cursor(mm, where)
            if size < 24 or mm[:4] != b"GGUF":
                raise InputError(f"{where}: not a GGUF file (no GGUF magic)")
            cur.pos = 4
            version = cur.take("<I")
            if version not in (2, 3):
                raise InputError(f"{where}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
            if n_tensors > size or n_kv > size:
                raise InputError(f"{where}: corrupt GGUF header")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                meta[key] = cur.value(cur.take("<I"))
            raw: list[tuple[str, tuple[int, ...], int, int]] = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.take("<I")
                if n_dims > 8:
                    raise InputError(f"{where}: corrupt GGUF tensor entry {name!r}")
                ne = tuple(cur.take("<Q") for _ in range(n_dims))
                raw.append((name, ne, cur.take("<I"), cur.take("<Q")))
            align = meta.get("general.alignment", 32)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise InputError(f"{where}: corrupt GGUF header (alignment {align!r})")
            data_start = cur.pos + (-cur.pos % align)
    except OSError as e:
        raise InputError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # mmap of an empty file
        raise InputError(f"{where}: not a GGUF file ({e})") from None
    tensors: list[GGUFTensor] = []
    for name, ne, tcode, rel in raw:
        try:
            qtype = gguf.GGMLQuantizationType(tcode)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise InputError(f"{where}: tensor {name} has an unknown GGML type {tcode}") from None
        n_elems = 1
        for d in ne:
            n_elems *= int(d)
        row = int(ne[0]) if ne else 1
        if row % block:
            raise InputError(f"{where}: tensor {name} has rows of {row} values, not a multiple of its {qtype.name} block of {block}")
        nbytes = n_elems // block * type_size
        begin = data_start + rel
        if begin + nbytes > size:
            raise InputError(f"{where}: {path} is truncated (tensor {name} ends past the end of the file)")
        tensors.append(GGUFTensor(name, int(tcode), qtype.name, tuple(int(d) for d in reversed(ne)), begin, nbytes, row // block * type_size))
    return meta, tensors


def gguf_config(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """A Hugging Face style config.json built from the GGUF metadata (what the family tables read)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise InputError(f"{where}: GGUF metadata lacks general.architecture")
    if arch not in GGUF_ARCH_TO_MODEL_TYPE:
        raise InputError(f"{where}: unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCH_TO_MODEL_TYPE))}")

    def get(key: str, required: bool = True) -> Any:
        v = meta.get(f"{arch}.{key}")
        if isinstance(v, ArrayMeta):  # per-layer values (some architectures): not supported here
            raise InputError(f"{where}: GGUF metadata {arch}.{key} varies per layer; not supported")
        if v is None and required:
            raise InputError(f"{where}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv = get("attention.head_count_kv", required=False)
    head_dim = get("attention.key_length", required=False)
    config: dict[str, Any] = {
        "model_type": GGUF_ARCH_TO_MODEL_TYPE[arch],
        "gguf_architecture": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv) if kv is not None else heads,
        "head_dim": int(head_dim) if head_dim is not None else hidden // heads,
    }
    for key, hf in (("rope.freq_base", "rope_theta"), ("attention.layer_norm_rms_epsilon", "rms_norm_eps"), ("context_length", "max_position_embeddings")):
        v = meta.get(f"{arch}.{key}")
        if isinstance(v, (int, float)):
            config[hf] = v
    return config


def reverse_permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (GGUF order -> Hugging Face order), as transformers'
    GGUF loader does: rows (head, d, half) -> (head, half, d)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (Hugging Face order -> GGUF order)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A .gguf base model, with Checkpoint's interface (see checkpoint.Checkpoint)."""

    def __init__(self, path: str | os.PathLike[str], role: str = "model") -> None:
        self.path = Path(path)
        self.role = role
        where = f"{role} {self.path}"
        if not self.path.is_file():
            raise InputError(f"{where}: no such file")
        self._gguf = require_gguf()
        self.meta, table = read_gguf_header(self.path, where)
        self.config = gguf_config(self.meta, where)
        self.family: Family = family_for(self.config, where)
        self.dims: ModelDims = model_dims(self.config, self.family, where)
        self.arch: str = self.config["gguf_architecture"]
        self.layer_prefix = self.family.layer_prefixes[0]
        # Hugging Face name -> GGUF tensor; tensors that are not a mapped module keep their GGUF name.
        hf_of: dict[str, str] = {}
        for layer in range(self.dims.num_layers):
            for module, gname in GGUF_MODULES.items():
                hf_of[f"blk.{layer}.{gname}.weight"] = self.weight_name(layer, module)
        self._entries: dict[str, GGUFTensor] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for t in table:
            name = hf_of.get(t.gguf_name, t.gguf_name)
            self._entries[name] = t
            self.tensors[name] = TensorInfo(name, self.path, t.shape, t.type_name)
        self._permuted: dict[str, int] = {}
        if self.arch in PERMUTED_ARCHS:
            for layer in range(self.dims.num_layers):
                self._permuted[self.weight_name(layer, "q")] = self.dims.num_heads
                self._permuted[self.weight_name(layer, "k")] = self.dims.num_kv_heads
        if self.weight_name(0, "q") not in self.tensors:
            raise InputError(f"{where}: no decoder layer weights found (looked for blk.0.attn_q.weight)")
        self._map: np.memmap | None = None

    # ---- names ----------------------------------------------------------------------------
    def weight_name(self, layer: int, module: str) -> str:
        return f"{self.layer_prefix}.{layer}.{self.family.modules[module]}.weight"

    def gguf_name(self, name: str) -> str:
        return self.entry(name).gguf_name

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.role} {self.path}: tensor {name} not found") from None

    def entry(self, name: str) -> GGUFTensor:
        self.info(name)
        return self._entries[name]

    # ---- reading --------------------------------------------------------------------------
    def _mm(self) -> np.memmap:
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise InputError(f"{self.role}: cannot open {self.path}: {e}") from None
        return self._map

    def _raw_rows(self, t: GGUFTensor, start: int, stop: int) -> np.ndarray:
        """The stored bytes of rows [start, stop) of a 2-D tensor, as a (rows, row_bytes) view of the map."""
        b = t.offset + start * t.row_bytes
        return self._mm()[b : b + (stop - start) * t.row_bytes].reshape(stop - start, t.row_bytes)

    def _decode(self, t: GGUFTensor, start: int, stop: int, rows_to: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """GGUF rows [start, stop): a view of the map for F32/F16/BF16, else float32. With `rows_to`
        (one destination row index per GGUF row, -1 for rows not wanted), the rows are scattered
        into `out` chunk by chunk instead (the q/k un-permutation without a second full copy)."""
        raw = self._raw_rows(t, start, stop)
        if t.type_name in PLAIN and rows_to is None:
            np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t.type_name]
            arr = raw.view(np_dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only map: never written to
                view = torch.from_numpy(arr)
            return view.view(torch.bfloat16) if t.type_name == "BF16" else view
        n = t.shape[-1]
        if out is None:
            out = torch.empty(stop - start, n, dtype=torch.float32)
        step = max(1, DEQUANT_CHUNK // (4 * n))
        try:
            for s in range(0, stop - start, step):
                e = min(stop - start, s + step)
                if t.type_name in PLAIN:
                    block = self._decode(t, start + s, start + e).float()
                else:
                    qtype = self._gguf.GGMLQuantizationType(t.ggml_type)
                    block = torch.from_numpy(np.ascontiguousarray(self._gguf.quants.dequantize(raw[s:e], qtype), dtype=np.float32).reshape(e - s, n))
                if rows_to is None:
                    out[s:e] = block
                else:
                    dest = rows_to[s:e]
                    keep = dest >= 0
                    out[dest[keep]] = block[keep].to(out.dtype)
        except NotImplementedError:
            raise InputError(
                f"{self.role}: tensor {t.gguf_name} is stored as {t.type_name}, which cannot be dequantized here; "
                f"supported: F32, F16, BF16, {', '.join(SUPPORTED_QUANTS)}"
            ) from None
        return out

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor (Hugging Face row order): stored dtype for F32/F16/BF16,
        float32 for quantized types. Only the quant blocks of those rows are read and dequantized
        (quant blocks run along a row); a permuted q/k reads the whole heads that hold them."""
        t = self.entry(name)
        if len(t.shape) != 2:
            raise InputError(f"{self.role}: tensor {name} is not a matrix")
        m = t.shape[0]
        start, stop = max(0, start), min(m, stop)
        heads = self._permuted.get(name)
        try:
            if heads is None:
                return self._decode(t, start, stop)
            # Hugging Face row i of the permuted q/k is GGUF row hf_to_gguf[i]; the GGUF rows of the
            # heads that hold [start, stop) are decoded in chunks and scattered into place.
            rows = m // heads
            g0, g1 = start // rows * rows, -(-stop // rows) * rows
            gguf_rows = reverse_permute_rows(torch.arange(g0, g1), (g1 - g0) // rows)  # at HF position p: its GGUF row
            rows_to = torch.full((g1 - g0,), -1, dtype=torch.long)
            rows_to[gguf_rows - g0] = torch.arange(g0, g1) - start
            rows_to[(rows_to < 0) | (rows_to >= stop - start)] = -1
            dtype = PLAIN.get(t.type_name, torch.float32)
            out = torch.empty(stop - start, t.shape[-1], dtype=dtype)
            return self._decode(t, g0, g1, rows_to=rows_to, out=out)
        except (OSError, ValueError) as e:
            raise InputError(f"{self.role}: cannot read tensor {name} from {self.path}: {e}") from None

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor (Hugging Face layout): stored dtype for F32/F16/BF16, float32 otherwise."""
        t = self.entry(name)
        if len(t.shape) == 2:
            return self.read_rows(name, 0, t.shape[0])
        flat = self._decode(GGUFTensor(t.gguf_name, t.ggml_type, t.type_name, (1, int(np.prod(t.shape))), t.offset, t.nbytes, t.nbytes), 0, 1)
        return flat.reshape(t.shape)

    def advise(self, name: str) -> None:
        """Ask the kernel to read a tensor's bytes into the page cache ahead (no-op where unsupported)."""
        t = self.entry(name)
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                advise(fd, t.offset, t.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

    def content_hash(self, name: str, memo: HashMemo | None = None) -> str:
        """BLAKE2b-256 of the tensor's bytes as stored (quantized), the basis cache's content key; for
        a q/k whose rows are permuted on reading, mixed with the head count, since the matrix factored
        is the permuted one. `memo` remembers hashes of unchanged files between runs (cache.HashMemo)."""

        t = self.entry(name)
        try:
            h = memo.get(self.path, t.offset, t.nbytes) if memo is not None else None
            if h is None:
                h = hashing.content_hash(self.path, t.offset, t.nbytes)
                if memo is not None:
                    memo.put(self.path, t.offset, t.nbytes, h)
        except (OSError, ValueError) as e:
            raise InputError(f"{self.role}: cannot read tensor {name} from {self.path}: {e}") from None
        heads = self._permuted.get(name)
        if heads is not None:
            h = hashlib.blake2b(f"{h}|gguf-unpermute:{heads}".encode(), digest_size=32).hexdigest()
        return h

    def identity(self) -> str:
        """Config plus every tensor's name, stored type and shape (as Checkpoint.identity)."""
        return model_identity(self.config, self.tensors)

    def fingerprint(self) -> str:
        """Identity plus the file's size and modification time."""
        st = self.path.stat()
        return hashlib.sha256(f"{self.identity()}:{self.path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]

    def close(self) -> None:
        self._map = None

    def release_pages(self, limit: int) -> None:
        """Unmap the file once this process holds more than `limit` bytes of mapped file pages."""

        if self._map is not None and host_file_bytes() > limit:
            self._map = None
