"""Fused target modules and uniform-rank outputs: where each unit's projected factors go.

A fused PEFT layer (phi3's qkv_proj, gpt_neox's query_key_value, gpt2's c_attn, phi3's gate_up_proj)
has one lora_A and one lora_B for all its parts. Each part p (q, k, v; or gate, up) is transferred
on its own (its rows of the fused weight have their own SVD), so the parts' projected A_p differ and
cannot share one A. The exact representation used here stacks the ranks:

    A = [A_q; A_k; A_v]                      (k_q + k_k + k_v) x n'
    B = blockdiag(c_q B_q, c_k B_k, c_v B_v)  m' x (k_q + k_k + k_v), rows in the module's own order

so that s B A restricted to part p's rows is s c_p B_p A_p = s_p B_p A_p: with s the fused module's
scale (its alpha is set from the first part's scale and the stacked rank, alpha = s R, or s sqrt(R)
with rslora) and c_p = s_p / s folded into B, every part keeps the delta it would have alone.

The same placement pads a module's rank with zero rows of A and zero columns of B (`--for vllm`:
one r for every module) and folds a scale ratio into B (one lora_alpha for every module).

Each unit writes *regions* of the output tensors: whole rows of lora_A and lora_B. A region's rows
need not be contiguous (gpt_neox interleaves q, k, v per head); rows of a fused module that no unit
covers (a part the source adapter did not train) are zeros, written by the first part present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Placement:
    a_tensor: str  # output lora_A name
    a_shape: tuple[int, int]
    a_rows: Ranges  # rows of lora_A this unit writes (its own rank rows, plus padding rows)
    a_part: int  # first row of lora_A that holds this unit's A (k rows from there)
    b_tensor: str
    b_shape: tuple[int, int]
    b_rows: Ranges  # rows of lora_B this unit writes (its part's rows, plus uncovered rows)
    b_part: Ranges  # rows of lora_B that hold this unit's B rows, in the part's row order
    b_cols: tuple[int, int]  # columns of lora_B that hold this unit's B
    b_scale: float  # folded into B: the part's scale over the module's written scale

    @property
    def a_region(self) -> str:
        return self.a_tensor if self.a_rows == ((0, self.a_shape[0]),) else f"{self.a_tensor}#{self.a_part}"

    @property
    def b_region(self) -> str:
        return self.b_tensor if self.b_rows == ((0, self.b_shape[0]),) else f"{self.b_tensor}#{self.b_cols[0]}"


def count(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def merge(ranges: list[tuple[int, int]]) -> Ranges:
    """Sorted, with touching ranges joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif a < b:
            out.append((a, b))
    return tuple(out)


def _local_index(region: Ranges, rows: Ranges) -> torch.Tensor:
    """Positions, inside a region's rows (in order), of the given tensor rows (in order)."""
    start_of: list[tuple[int, int, int]] = []
    pos = 0
    for a, b in region:
        start_of.append((a, b, pos))
        pos += b - a
    idx: list[torch.Tensor] = []
    for a, b in rows:
        for ra, rb, p in start_of:
            lo, hi = max(a, ra), min(b, rb)
            if lo < hi:
                idx.append(torch.arange(p + lo - ra, p + hi - ra))
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def unit_tensors(out_a: str, out_b: str, placement: Placement | None, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The bytes a unit writes: its factors as they are, or placed into its regions of the output."""
    if placement is None:
        return {out_a: A.to(dtype).cpu().contiguous(), out_b: B.to(dtype).cpu().contiguous()}
    p = placement
    k = A.shape[0]
    a_out = torch.zeros(count(p.a_rows), A.shape[1], dtype=A.dtype, device=A.device)
    ia = _local_index(p.a_rows, ((p.a_part, p.a_part + k),))
    a_out[ia.to(A.device)] = A
    b_out = torch.zeros(count(p.b_rows), p.b_shape[1], dtype=B.dtype, device=B.device)
    ib = _local_index(p.b_rows, p.b_part)
    b_out[ib.to(B.device), p.b_cols[0] : p.b_cols[1]] = B * p.b_scale if p.b_scale != 1.0 else B
    return {out_a: a_out.to(dtype).cpu().contiguous(), out_b: b_out.to(dtype).cpu().contiguous()}
