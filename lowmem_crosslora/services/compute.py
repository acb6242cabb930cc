"""The compute dtype: whether bfloat16 matmuls are fast on a device, and float32 compute on weights
stored in bfloat16 where they are not.

On CPUs with AMX or AVX512-BF16 a bfloat16 matmul runs about 3x float32's; on CPUs with only AVX2 it
runs at a hundredth of it (0.3 GFLOP/s against 35, measured), so a model kept in bfloat16 there
computes at a crawl. `bf16_speed` decides at run time, never at import, from the capability where
it is known (CUDA's bfloat16 support; the CPU flags /proc/cpuinfo lists: the same answer on every
run, so the same seed gives the same adapter) and from a short timing elsewhere (a 64 x 512 x 512
matmul in both dtypes, a few ms, once per process and device). `upcast_model` makes a model loaded in bfloat16 compute in float32 while
its big weights stay stored in bfloat16: every Linear multiplies by a float32 copy of its weight made
one block of rows at a time (at most UPCAST_BLOCK_BYTES, into one scratch block reused by every
widening: `widen`); the backward
pass makes the copy again for the input's gradient and saves only the bfloat16 weight. Embeddings
look their rows up in bfloat16 and widen them; norms, biases and buffers (small) become float32.
So memory stays at bfloat16 weights plus one float32 scratch block per thread (`release_scratch` frees
it), and the results are those of float32 compute on the bfloat16-rounded weights.

Tests force the decision with `bf16_speed(..., force=...)` or by setting `FORCE` (monkeypatch)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Tests (monkeypatch) force every decision: True = bfloat16 is fast, False = slow, None = measure.
FORCE: bool | None = None
# bfloat16 counts as fast where its matmul takes at most this multiple of float32's time.
FAST_RATIO = 1.0
# The float32 copy of a weight made at a time (rows of the weight): the upcast path's transient.
UPCAST_BLOCK_BYTES = 64 * 1024**2
# CPU flags that mean bfloat16 matmuls run in hardware (x86 AMX / AVX512-BF16, ARMv8.6 BF16).
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
_TIMING_SHAPE = (64, 512, 512)  # tokens x in x out: 0.2 ms in float32 on one core of an AMX CPU

_CACHE: dict[str, Speed] = {}


@dataclass(frozen=True)
class Speed:
    """Whether bfloat16 compute is fast on a device, how that was found, and the measured ratio
    (float32 time / bfloat16 time; None where not timed)."""

    fast: bool
    reason: str
    ratio: float | None = None

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.fast else "float32"


def bf16_speed(device: str, force: bool | None = None) -> Speed:
    """Whether bfloat16 matmuls are fast on `device` (cached per process and device). `force` (or
    the module's FORCE) answers without measuring."""
    force = FORCE if force is None else force
    if force is not None:
        return Speed(force, f"bfloat16 compute forced {'fast' if force else 'slow'}")
    if device not in _CACHE:
        _CACHE[device] = _measure(device)
    return _CACHE[device]


def _measure(device: str) -> Speed:
    kind = "CPU" if device == "cpu" else device
    if device.startswith("cuda"):
        ok = bool(torch.cuda.is_bf16_supported())
        return Speed(ok, f"CUDA device {'supports' if ok else 'lacks'} bfloat16")
    if device == "cpu":
        listed = _cpu_flags()
        if listed is not None:  # the capability, where the kernel lists it: the same answer on every run
            found = [f for f in BF16_FLAGS if f in listed]
            if found:
                return Speed(True, f"this CPU computes bfloat16 in hardware ({', '.join(found)})")
            return Speed(False, "this CPU lists no bfloat16 instructions (amx_bf16, avx512_bf16, bf16): bfloat16 matmuls would be emulated")
    t32, t16 = _timing(device)
    ratio = t32 / t16 if t16 > 0 else math.inf
    return Speed(ratio >= FAST_RATIO, f"bfloat16 matmul {ratio:.2g}x float32's speed on this {kind} (timed)", round(ratio, 3))


def _sync(device: str) -> None:
    if device == "mps":
        torch.mps.synchronize()
    elif device.startswith("cuda"):
        torch.cuda.synchronize()


def _timing(device: str, reps: int = 7) -> tuple[float, float]:
    """Best-of-`reps` seconds of one matmul in float32 and in bfloat16. On the CPU on one thread (the
    per-core ratio; a busy machine's thread hand-offs swamp a few-ms timing on more), restored after.
    The first bfloat16 product warms its kernels up; after three more, past 0.3 s, it stops: a slow
    CPU (0.2 s a product at 0.15 GFLOP/s), no need to wait for more."""
    m, k, n = _TIMING_SHAPE
    g = torch.Generator().manual_seed(0)  # its own generator: the global random state is left as it was
    a32, b32 = torch.randn(m, k, generator=g).to(device), torch.randn(n, k, generator=g).to(device)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        _sync(device)
        t = time.perf_counter()
        a @ b.T
        _sync(device)
        return time.perf_counter() - t

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        once(a32, b32)
        best32 = min(once(a32, b32) for _ in range(reps))
        once(a16, b16)
        best16, spent = math.inf, 0.0
        for i in range(reps):
            t = once(a16, b16)
            best16, spent = min(best16, t), spent + t
            if i >= 2 and spent > 0.3:  # three slow products (no preemption is that long thrice): enough
                break
        return best32, best16
    finally:
        if device == "cpu":
            torch.set_num_threads(threads)


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 "flags", ARM "Features"); None where
    there is no such file (macOS, Windows: there the timing decides)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    listed = {w for line in text.splitlines() if line.split(":", 1)[0].strip() in ("flags", "Features") for w in line.split(":", 1)[1].split()}
    return listed or None


# ---- bfloat16 storage, float32 compute --------------------------------------------------------------


def _rows(weight: torch.Tensor) -> int:
    return max(1, UPCAST_BLOCK_BYTES // (4 * max(1, weight.shape[1])))


# One float32 scratch block per (device, thread), reused by every widening: a fresh float32 copy per
# use made the allocator map, fault in and return its pages each time (0.8-0.9 s to widen all of
# Qwen2.5-0.5B once on one core, against 0.25-0.31 s into a reused block; three widenings a training
# pass). Forward and backward passes of one thread never widen two blocks at once.
_SCRATCH: dict[tuple[str, int], torch.Tensor] = {}


def widen(block: torch.Tensor) -> torch.Tensor:
    """`block` (a frozen weight's rows, any float dtype) as float32, equal to `block.float()`. A float32
    block is returned as it is; a narrower one is copied into this thread's reused scratch block (when
    it fits UPCAST_BLOCK_BYTES), so the result is valid only until this thread's next `widen`: use it at
    once, never keep it (nor let autograd save it)."""
    if block.dtype == torch.float32:
        return block
    n = block.numel()
    if 4 * n > UPCAST_BLOCK_BYTES:
        return block.float()
    key = (str(block.device), threading.get_ident())
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[key] = torch.empty(max(n, UPCAST_BLOCK_BYTES // 4), dtype=torch.float32, device=block.device)
    return buf[:n].view(block.shape).copy_(block)


def release_scratch() -> None:
    """Free the scratch blocks (at the end of a run that widened weights)."""
    _SCRATCH.clear()


class UpcastMatmul(torch.autograd.Function):
    """x @ W.float().T (+ bias) for a frozen W stored in a narrower dtype, W widened one block of
    rows at a time (`widen`); the backward pass widens W again for x's gradient and keeps only the stored W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        x = x.float()
        rows = _rows(weight)
        if weight.shape[0] <= rows:
            out = x @ widen(weight).T
        else:
            out = x.new_empty(*x.shape[:-1], weight.shape[0])
            for i in range(0, weight.shape[0], rows):
                out[..., i : i + rows] = x @ widen(weight[i : i + rows]).T
        if bias is not None:
            out = out + bias.float()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("the upcast Linear is for frozen weights only")
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = grad.float()
        rows = _rows(weight)
        if weight.shape[0] <= rows:
            return grad @ widen(weight), None, None
        gx = grad.new_zeros(*grad.shape[:-1], weight.shape[1])
        for i in range(0, weight.shape[0], rows):
            gx += grad[..., i : i + rows] @ widen(weight[i : i + rows])
        return gx, None, None


class UpcastLinear(torch.nn.Linear):
    """A frozen Linear that keeps its stored weight and computes in float32 (UpcastMatmul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return UpcastMatmul.apply(x, self.weight, self.bias)


class UpcastEmbedding(torch.nn.Embedding):
    """An Embedding that looks rows up in its stored dtype and returns them in float32 (exact)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def upcast_model(model: Any) -> int:
    """Make `model` (loaded in bfloat16) compute in float32, its Linear and Embedding weights left in
    their stored dtype; everything else (norms, biases, buffers) becomes float32. Returns the number
    of modules switched. Call before attaching adapters (PEFT wraps the switched layers as Linears)."""
    big: set[int] = set()
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            mod.__class__ = UpcastLinear
        elif type(mod) is torch.nn.Embedding:
            mod.__class__ = UpcastEmbedding
        else:
            continue
        big.add(id(mod.weight))
        n += 1
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in big and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for mod in model.modules():
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                    setattr(mod, name, b.float())
    return n


def upcast_bytes(cfg: dict[str, Any]) -> int:
    """Modelled extra working memory of the upcast path: two float32 weight blocks alive at once (the
    forward's and a backward's, at the edge of a step), at most UPCAST_BLOCK_BYTES each."""
    H = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * H)
    vocab = int(cfg.get("vocab_size") or 32000)
    largest = 4 * H * max(inter, vocab)
    return 2 * min(largest, UPCAST_BLOCK_BYTES + 4 * H)
