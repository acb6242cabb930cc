"""Device choice: 'auto' picks cuda, then mps, else cpu; an explicit device must exist."""

from __future__ import annotations

import torch

from lowmem_crosslora.errors import InputError


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, else cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available to this torch build")
        return name
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("--device mps: MPS is not available on this machine")
        return name
    raise InputError(f"unknown --device {name!r}; choose auto, cpu, cuda or mps")
