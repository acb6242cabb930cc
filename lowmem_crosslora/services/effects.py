"""What verify and refine share to judge an adapter on probe texts: paired means and ratios with their
standard errors, the adapters' per-module norms, and the random control adapter of the same norms.

A random adapter of realistic size also moves log-likelihood (it flattens the distribution), so an
adapter's recovery of the source effect means something only beside the recovery of a random adapter
with the same per-module Frobenius norms ||scale * B @ A||_F, scored on the same texts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora.io.adapter import Adapter
from lowmem_crosslora.services.probes import stable_seed

# z (mean over its standard error) below which a difference is "indistinguishable".
Z_CUTOFF = 2.0


def mean_se(x: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); SE is nan for fewer than 2 values."""
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(x) / n
    if n < 2:
        return m, math.nan
    var = math.fsum((v - m) ** 2 for v in x) / (n - 1)
    return m, math.sqrt(var / n)


def ratio_se(num: list[float], den: list[float]) -> tuple[float, float]:
    """mean(num) / mean(den) for paired samples, with the delta-method standard error
    (var(R) ~ (var(mean num) + R^2 var(mean den) - 2 R cov(mean num, mean den)) / mean(den)^2)."""
    n = len(num)
    if n == 0 or n != len(den):
        return math.nan, math.nan
    mn, md = math.fsum(num) / n, math.fsum(den) / n
    if md == 0:
        return math.nan, math.nan
    r = mn / md
    if n < 2:
        return r, math.nan
    vn = math.fsum((a - mn) ** 2 for a in num) / (n - 1)
    vd = math.fsum((b - md) ** 2 for b in den) / (n - 1)
    cov = math.fsum((a - mn) * (b - md) for a, b in zip(num, den, strict=True)) / (n - 1)
    var = (vn + r * r * vd - 2 * r * cov) / (n * md * md)
    return r, math.sqrt(max(var, 0.0))


def adapter_norms(adapter: Adapter) -> dict[str, float]:
    """||scale * B @ A||_F per module, from the small k x k Gram matrices (never forming m x n)."""
    out = {}
    for mod in adapter.modules.values():
        A = adapter.read(mod.a_name).double()
        B = adapter.read(mod.b_name).double()
        out[mod.module] = mod.scale * math.sqrt(max(0.0, float(((B.T @ B) * (A @ A.T)).sum())))
    adapter.close()
    return out


def lora_norm(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """||scale * B @ A||_F from the k x k Gram matrices."""
    A, B = A.detach().double(), B.detach().double()
    return scale * math.sqrt(max(0.0, float(((B.T @ B) * (A @ A.T)).sum())))


def random_factors(A0: torch.Tensor, B0: torch.Tensor, scale: float, want: float, seed: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian factors shaped like (A0, B0), seeded by (seed, module), rescaled so that ||scale B A||_F
    equals `want` (zero factors for `want` 0); in A0's and B0's dtypes."""
    g = torch.Generator().manual_seed(stable_seed("control", seed, module))
    A = torch.randn(A0.shape, generator=g, dtype=torch.float64)
    B = torch.randn(B0.shape, generator=g, dtype=torch.float64)
    have = lora_norm(A, B, scale)
    k = math.sqrt(want / have) if have > 0 else 0.0
    return (A * k).to(A0.dtype), (B * k).to(B0.dtype)


def lora_modules(peft_model: Any, name: str) -> list[tuple[str, Any]]:
    """(module name without PEFT's base_model.model. prefix, module) of every LoRA layer holding adapter `name`."""
    out = []
    for mod_name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and name in lora_a:
            out.append((mod_name.split("base_model.model.", 1)[-1], module))
    return out


def install_control(peft_model: Any, transferred: str | Path, seed: int, name: str = "control", like: str | None = None) -> dict[str, float]:
    """Load `transferred` a second time as adapter `name` and replace its factors by random directions
    (Gaussian A and B, seeded per module) rescaled so that ||s B A||_F equals the transferred module's.
    `like` names the loaded adapter whose norms it takes (default: the other one). Returns the
    control's norm per module."""

    peft_model.load_adapter(str(transferred), adapter_name=name)
    norms: dict[str, float] = {}
    for short, module in lora_modules(peft_model, name):
        src = like if like is not None else next(k for k in module.lora_A if k != name)
        A0, B0 = module.lora_A[src].weight, module.lora_B[src].weight
        s = float(module.scaling[name])
        with torch.no_grad():
            want = lora_norm(A0, B0, s)
            A, B = random_factors(A0, B0, s, want, seed, short)
            module.lora_A[name].weight.copy_(A)
            module.lora_B[name].weight.copy_(B)
            norms[short] = want
    return norms


def lora_is_nil(peft_model: Any, name: str = "default") -> bool:
    """Whether adapter `name` adds exactly nothing: every module's B (or A) factor all zeros, as a fresh
    LoRA starts. Its control (random factors of the same, zero, norms) is then zero as well."""
    mods = lora_modules(peft_model, name)
    return bool(mods) and all(not bool(m.lora_B[name].weight.any()) or not bool(m.lora_A[name].weight.any()) for _short, m in mods)


class ControlInPlace:
    """Within `with`: adapter `name`'s factors replaced by the random control of the same per-module
    norms (seeded by `seed` and the module), as install_control makes it; on exit the adapter's own
    factors are put back bit for bit. One adapter, no second copy of the model's LoRA layers loaded."""

    def __init__(self, peft_model: Any, seed: int, name: str = "default") -> None:
        self.model, self.seed, self.name = peft_model, seed, name
        self.kept: list[tuple[Any, torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> ControlInPlace:
        with torch.no_grad():
            for short, module in lora_modules(self.model, self.name):
                wa, wb = module.lora_A[self.name].weight, module.lora_B[self.name].weight
                s = float(module.scaling[self.name])
                self.kept.append((module, wa.detach().clone(), wb.detach().clone()))
                A, B = random_factors(wa, wb, s, lora_norm(wa, wb, s), self.seed, short)
                wa.copy_(A)
                wb.copy_(B)
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for module, a, b in self.kept:
                module.lora_A[self.name].weight.copy_(a)
                module.lora_B[self.name].weight.copy_(b)
        self.kept = []
