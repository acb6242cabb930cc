"""LoRA-Align and LoRA-Shift in factors: B_t = U_t (U_s^T B), A_t = (A V_s) V_t^T.

No m x n matrix is ever formed. Rank k and lora_alpha carry over, so the scale s = alpha / k (or
alpha / sqrt(k)) applies unchanged on the target: dW_t = s B_t A_t = P_U dW_s P_V^T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Projected:
    A: torch.Tensor  # k x n'
    B: torch.Tensor  # m' x k
    energy_retained: float | None  # ||U_s^T dW V_s||_F / ||dW||_F; None when dW = 0


def frobenius_of_product(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F without forming B @ A: sqrt(trace((B^T B)(A A^T))), in float64."""
    B64, A64 = B.double(), A.double()
    value = float(((B64.T @ B64) * (A64 @ A64.T)).sum())
    return math.sqrt(max(value, 0.0))


def project_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    U_s: torch.Tensor,
    V_s: torch.Tensor,
    U_t: torch.Tensor,
    V_t: torch.Tensor,
) -> Projected:
    """Project one module's factors. A (k x n), B (m x k); U_s (m x r), V_s (n x r); U_t (m' x r), V_t (n' x r)."""
    dtype = U_s.dtype
    A = A.to(dtype)
    B = B.to(dtype)
    Bp = U_s.T @ B  # r x k
    Ap = A @ V_s  # k x r
    before = frobenius_of_product(B, A)
    after = frobenius_of_product(Bp, Ap)
    energy = after / before if before > 0 else None
    return Projected(A=Ap @ V_t.T, B=U_t @ Bp, energy_retained=energy)
