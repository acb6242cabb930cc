"""What every checkpoint reader shares: the declared reader interface, tensor metadata, identities."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lowmem_crosslora.architectures import Family, ModelDims
from lowmem_crosslora.errors import InputError

if TYPE_CHECKING:
    from lowmem_crosslora.io.hashing import HashMemo


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what}: {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise InputError(f"{what}: {path} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str


class CheckpointReader(Protocol):
    """A base model as the transfer reads it, whatever its file format: safetensors folders
    (safetensors_model.Checkpoint) and GGUF files (gguf_model.GGUFCheckpoint) both provide this;
    open_checkpoint (checkpoints.py) picks one. A new format is a new class with these members."""

    path: Path
    role: str
    config: dict[str, Any]
    family: Family
    dims: ModelDims
    layer_prefix: str
    tensors: dict[str, TensorInfo]

    def weight_name(self, layer: int, module: str) -> str:
        """The tensor name of a canonical module (q, k, ..., down) of a layer."""
        ...

    def has(self, name: str) -> bool: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, widened or dequantized to a float dtype."""
        ...

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D weight, as read() would give them."""
        ...

    def advise(self, name: str) -> None:
        """A hint that `name` is read next (the pages may be fetched ahead)."""
        ...

    def content_hash(self, name: str, memo: HashMemo | None = None) -> str:
        """A hash of the tensor's stored bytes (the basis cache's key)."""
        ...

    def identity(self) -> str:
        """What the model is (config plus tensor names, dtypes and shapes), wherever it lies."""
        ...

    def fingerprint(self) -> str:
        """The identity plus the files' sizes and times: changes when a weight file does."""
        ...

    def close(self) -> None: ...

    def release_pages(self, limit: int) -> None:
        """Unmap the files when more than `limit` bytes of their pages are resident."""
        ...


def model_identity(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> str:
    """What a model is, independent of where and how it lies: its config plus every tensor's name,
    stored dtype and shape."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    for name, info in sorted(tensors.items()):
        h.update(json.dumps([name, info.dtype, list(info.shape)]).encode())
    return h.hexdigest()[:32]
