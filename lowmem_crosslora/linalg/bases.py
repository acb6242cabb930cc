"""Rank-r truncated SVD bases of base-model weights.

One randomized algorithm (Halko, Martinsson and Tropp; the same passes as torch.svd_lowrank)
runs over a matrix *operator*, so the in-core path (the whole float32 matrix on the device) and
the out-of-core path (row blocks read from the memory map and widened one block at a time) share
every step but the order of additions. The Gaussian test matrix comes from a generator seeded by a
stable key, so the same inputs give the same bytes. Exact SVD is used where r is close to
min(m, n); scipy's LAPACK on the CPU is the last resort when a torch path raises.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.linalg
import torch

# Reads rows [start, stop) of a weight in its stored dtype.
RowReader = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class SvdSettings:
    """How bases are computed (defaults and help: services/options.py's TransferOptions)."""

    rank: int
    oversample: int
    niter: int
    exact_ratio: float  # exact SVD when q >= exact_ratio * min(m, n)
    compute_dtype: torch.dtype

    def q_for(self, r: int, m: int, n: int) -> int:
        return min(r + self.oversample, m, n)

    def uses_exact(self, r: int, m: int, n: int, device: str = "cpu") -> bool:
        """LAPACK's exact SVD where r is close to min(m, n), on the CPU (where it is also the faster
        choice). On a GPU the solver's exact SVD is slow on these shapes; there the range finder at
        full width, q = min(m, n), is exact up to rounding and several times faster."""
        return device == "cpu" and self.q_for(r, m, n) >= self.exact_ratio * min(m, n)

    def key(self) -> str:
        return f"q=r+{self.oversample},niter={self.niter},exact>={self.exact_ratio},{str(self.compute_dtype).replace('torch.', '')}"


@dataclass
class Basis:
    """W ~ U diag(S) V^T with U (m x r), V (n x r) orthonormal columns, on the CPU, float32 or better."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str
    device: str
    seconds: float


def seed_for(fingerprint: str, tensor: str, r: int, seed: int = 0) -> int:
    """A stable 63-bit seed from the model's fingerprint, the tensor name, the rank and the user seed."""
    digest = hashlib.blake2b(f"{fingerprint}|{tensor}|{r}|{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_i, v_i) so that the entry of u_i with the largest magnitude is positive."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs[signs == 0] = 1
    return U * signs, V * signs


class MatrixOperator(Protocol):
    shape: tuple[int, int]

    def matmul(self, X: torch.Tensor) -> torch.Tensor: ...  # W @ X

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor: ...  # W^T @ Y


class InCoreMatrix:
    """The whole matrix, widened to the compute dtype, resident on the device."""

    def __init__(self, W: torch.Tensor) -> None:
        self.W = W
        self.shape = (int(W.shape[0]), int(W.shape[1]))

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.W @ X

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self.W.T @ Y


class BlockedMatrix:
    """A matrix read in row blocks from the memory map on every pass; one widened block at a time.

    Extra memory is one block plus the (m + n) x q panels, never m x n.
    """

    def __init__(
        self,
        read_rows: RowReader,
        shape: tuple[int, int],
        block_rows: int,
        device: torch.device,
        dtype: torch.dtype,
        check: Callable[[], None] | None = None,
        transposed: bool = False,
    ) -> None:
        self.read_rows = read_rows
        self.stored_shape = shape
        self.shape = (shape[1], shape[0]) if transposed else shape
        self.transposed = transposed
        self.block_rows = max(1, int(block_rows))
        self.device = device
        self.dtype = dtype
        self.check = check
        self.passes = 0

    def _blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        self.passes += 1
        m = self.stored_shape[0]
        for start in range(0, m, self.block_rows):
            stop = min(m, start + self.block_rows)
            # Copy in the stored dtype, then widen where the block will be used (on the device).
            block = self.read_rows(start, stop).to(device=self.device).to(self.dtype)
            yield start, stop, block
            if self.check is not None:
                self.check()

    def _stored_matmul(self, X: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.stored_shape[0], X.shape[1], device=self.device, dtype=self.dtype)
        for start, stop, block in self._blocks():
            torch.mm(block, X, out=out[start:stop])
        return out

    def _stored_rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.stored_shape[1], Y.shape[1], device=self.device, dtype=self.dtype)
        for start, stop, block in self._blocks():
            out.addmm_(block.T, Y[start:stop])
        return out

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self._stored_rmatmul(X) if self.transposed else self._stored_matmul(X)

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self._stored_matmul(Y) if self.transposed else self._stored_rmatmul(Y)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


class Transposed:
    """The transpose of an operator, without moving a byte."""

    def __init__(self, op: MatrixOperator) -> None:
        self.op = op
        self.shape = (op.shape[1], op.shape[0])

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.op.rmatmul(X)

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        return self.op.matmul(Y)


def randomized_svd(
    op: MatrixOperator, r: int, q: int, niter: int, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of the operator's matrix: q-column range finder, niter power iterations.

    A wide matrix is factored as its (tall) transpose, as torch.svd_lowrank does, so the small SVD
    at the end is of a q x min(m, n) matrix. When q reaches min(m, n) the range finder spans the
    whole column space in one pass, so the result is exact up to rounding and power iterations are
    skipped.
    """
    m, n = op.shape
    if m < n:
        U, S, V = randomized_svd(Transposed(op), r, q, niter, seed, device, dtype)
        return V, S, U
    if q >= n:
        q, niter = n, 0
    # The test matrix is drawn where it is used: on CUDA from CUDA's own seeded generator (drawing on
    # the host and copying would cost more than the factorization); elsewhere from the CPU's.
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32, device=gen_device).to(device=device, dtype=dtype)
    Q = _orth(op.matmul(omega))  # m x q
    del omega
    for _ in range(niter):
        Q = _orth(op.rmatmul(Q))
        Q = _orth(op.matmul(Q))
    Bt = op.rmatmul(Q)  # n x q, the transpose of Q^T W
    Ub, S, Vh = torch.linalg.svd(Bt, full_matrices=False)  # Bt = Ub S Vh, so W ~ (Q Vh^T) S Ub^T
    U = Q @ Vh.T[:, :r]
    return U, S[:r], Ub[:, :r]


def randomized_svd_stack(
    W: torch.Tensor, r: int, q: int, niter: int, seeds: list[int], device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """randomized_svd of each matrix of a stack W (k x m x n, resident on `device` in `dtype`) at once:
    batched products, batched QR, batched small SVD, so k same-shape factorisations cost one launch
    sequence instead of k (on a GPU, where a small factorisation is bound by its launches). Matrix i
    draws its test matrix from seeds[i] exactly as randomized_svd does, so each result equals the
    unbatched one up to the rounding of the batched kernels."""
    k, m, n = W.shape
    if len(seeds) != k:
        raise ValueError(f"{len(seeds)} seeds for a stack of {k} matrices")
    if m < n:
        return [(V, S, U) for U, S, V in randomized_svd_stack(W.transpose(1, 2), r, q, niter, seeds, device, dtype)]
    if q >= n:
        q, niter = n, 0
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    omega = torch.empty(k, n, q, dtype=dtype, device=device)
    for i, seed in enumerate(seeds):  # each matrix's own test matrix, drawn as randomized_svd draws it
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        omega[i] = torch.randn(n, q, generator=gen, dtype=torch.float32, device=gen_device).to(device=device, dtype=dtype)
    Q = _orth(torch.bmm(W, omega))  # k x m x q
    del omega
    Wt = W.transpose(1, 2)
    for _ in range(niter):
        Q = _orth(torch.bmm(Wt, Q))
        Q = _orth(torch.bmm(W, Q))
    Bt = torch.bmm(Wt, Q)  # k x n x q
    Ub, S, Vh = torch.linalg.svd(Bt, full_matrices=False)
    U = torch.bmm(Q, Vh.transpose(1, 2)[:, :, :r])
    return [(U[i], S[i, :r], Ub[i, :, :r]) for i in range(k)]


def exact_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD, truncated. LAPACK's divide and conquer is several times faster on a tall matrix
    than on its wide transpose, so a wide W is factored as W^T."""
    if W.shape[0] < W.shape[1]:
        V, S, Uh = torch.linalg.svd(W.T, full_matrices=False)
        return Uh[:r].T, S[:r], V[:, :r]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r].T


def scipy_svd(W: np.ndarray, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD through scipy's LAPACK (gesvd, the most robust driver), on the CPU."""

    U, S, Vh = scipy.linalg.svd(W, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    return torch.from_numpy(np.ascontiguousarray(U[:, :r])), torch.from_numpy(S[:r].copy()), torch.from_numpy(np.ascontiguousarray(Vh[:r].T))


def finish(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, method: str, device: str, t0: float) -> Basis:
    """Fix the signs. The factors stay where they were computed: the projection runs there too."""
    U, V = fix_signs(U, V)
    return Basis(U.contiguous(), S, V.contiguous(), method, device, time.perf_counter() - t0)
