"""What every checkpoint reader shares: the declared reader interface, tensor metadata, identities."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem_crosslora.errors import InputError

if TYPE_CHECKING:
    pass




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
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str


def model_identity(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> str:
    """What a model is, independent of where and how it lies: its config plus every tensor's name,
    stored dtype and shape."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    for name, info in sorted(tensors.items()):
        h.update(json.dumps([name, info.dtype, list(info.shape)]).encode())
    return h.hexdigest()[:32]
