"""A PEFT LoRA adapter folder: its config, its per-module scales and its factors, read lazily."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import read_json, read_safetensors_header
from .errors import InputError

PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<kind>weight|bias)$")


def peft_pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The pattern key PEFT would pick for a module name (first key whose regex ends the name)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class LoraModule:
    """One adapted linear module of the source: dW = scale * B @ A."""

    module: str  # PEFT module path, e.g. model.layers.3.self_attn.q_proj
    a_name: str
    b_name: str
    rank: int
    alpha: float
    scale: float
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    dtype: str


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"tensor": ..., "reason": ...}
    file: Path | None = None
    _handle: Any = field(default=None, repr=False)

    @property
    def default_rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def default_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def scale_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def read(self, name: str) -> torch.Tensor:
        """One factor, copied out of the map (adapters are small; the handle is opened once)."""
        assert self.file is not None
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.file), framework="pt", device="cpu")
            return self._handle.get_tensor(name).clone()
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"adapter: cannot read tensor {name} from {self.file}: {e}") from None

    def close(self) -> None:
        self._handle = None


def load_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read an adapter folder's config and tensor layout (headers only) and check it is a plain LoRA."""
    p = Path(path)
    where = f"adapter {p}"
    if not p.exists():
        raise InputError(f"{where}: no such file or directory")
    if not p.is_dir():
        raise InputError(f"{where}: expected an adapter folder (adapter_config.json + adapter_model.safetensors)")
    config = read_json(p / "adapter_config.json", "adapter")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{where}: peft_type {peft_type} is not supported; only LoRA adapters can be transferred")
    if config.get("use_dora"):
        raise InputError(f"{where}: DoRA adapters (use_dora=true) are not supported; only plain LoRA can be transferred")
    file = p / "adapter_model.safetensors"
    if not file.exists():
        if (p / "adapter_model.bin").exists():
            raise InputError(
                f"{where}: only a pickled adapter_model.bin found; convert it to adapter_model.safetensors first "
                "(pickle files can run code when loaded, so they are never opened here)"
            )
        raise InputError(f"{where}: adapter_model.safetensors not found")
    header = read_safetensors_header(file, "adapter")
    adapter = Adapter(p, config, file=file)
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})

    factors: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    for name, info in sorted(header.items()):
        if name == "__metadata__":
            continue
        m = _FACTOR.match(name)
        if "lora_magnitude_vector" in name:
            raise InputError(f"{where}: tensor {name} is a DoRA magnitude; DoRA adapters are not supported")
        if m is None:
            if "lora_embedding" in name:
                reason = "embedding LoRA is not transferred (vocabularies differ between models)"
            else:
                reason = "not a LoRA factor (modules_to_save or a full weight copy); not transferred"
            adapter.skipped.append({"tensor": name, "reason": reason})
            continue
        if m.group("kind") == "bias":
            adapter.skipped.append({"tensor": name, "reason": "LoRA bias (lora_bias) is not transferred"})
            continue
        module = m.group("module")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX) :]
        factors.setdefault(module, {})[m.group("which")] = (name, info)

    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "B" not in parts else "lora_A"
            raise InputError(f"{where}: module {module} has no {missing} tensor")
        (a_name, a_info), (b_name, b_info) = parts["A"], parts["B"]
        a_shape, b_shape = tuple(a_info["shape"]), tuple(b_info["shape"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise InputError(f"{where}: module {module} has factors of shapes A {list(a_shape)} and B {list(b_shape)}, which do not multiply")
        if a_info["dtype"] not in ("F32", "F16", "BF16", "F64"):
            raise InputError(f"{where}: tensor {a_name} has dtype {a_info['dtype']}; expected a float type")
        rank = int(a_shape[0])
        rkey = peft_pattern_key(rank_pattern, module)
        cfg_rank = int(rank_pattern[rkey]) if rkey is not None else adapter.default_rank
        if cfg_rank != rank:
            raise InputError(f"{where}: module {module} has rank {rank} in its tensors but {cfg_rank} in adapter_config.json")
        akey = peft_pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[akey]) if akey is not None else adapter.default_alpha
        adapter.modules[module] = LoraModule(
            module=module,
            a_name=a_name,
            b_name=b_name,
            rank=rank,
            alpha=alpha,
            scale=adapter.scale_for(rank, alpha),
            a_shape=(int(a_shape[0]), int(a_shape[1])),
            b_shape=(int(b_shape[0]), int(b_shape[1])),
            dtype=str(a_info["dtype"]),
        )
    if not adapter.modules:
        raise InputError(f"{where}: no LoRA factors (lora_A / lora_B) found in {file.name}")
    return adapter


def check_finite(adapter: Adapter) -> None:
    """Every LoRA factor must be finite: NaN or Inf would poison the projection silently."""
    assert adapter.file is not None
    try:
        with safe_open(str(adapter.file), framework="pt", device="cpu") as f:
            for mod in adapter.modules.values():
                for name in (mod.a_name, mod.b_name):
                    if not torch.isfinite(f.get_tensor(name)).all():
                        raise InputError(f"adapter {adapter.path}: tensor {name} contains NaN or Inf")
    except (SafetensorError, OSError) as e:
        raise InputError(f"adapter: cannot read {adapter.file}: {e}") from None


def adapter_fingerprint(adapter: Adapter) -> str:
    """Content hash of the adapter's config and weights (adapters are small: hash every byte)."""
    import hashlib

    h = hashlib.sha256()
    h.update((adapter.path / "adapter_config.json").read_bytes())
    assert adapter.file is not None
    with open(adapter.file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]
