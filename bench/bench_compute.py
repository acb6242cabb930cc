"""Step time and peak private memory of a forward + backward through a stack of frozen Linear layers
(Qwen2.5-0.5B's MLP shapes, 896 <-> 4864) in the three compute paths refine can choose
(services/compute.py). Peaks: private memory above what the process held once its weights were made
(sampled every 2 ms) and the kernel's RSS high-water mark above the same start (weights included
from the start, so this is working memory too):

  bf16      bfloat16 weights, bfloat16 compute (fast where AMX / AVX512-BF16 exist)
  fp32      float32 weights, float32 compute
  upcast    bfloat16 weights, float32 compute (one float32 block of a weight alive at a time)

Each path runs in its own process (clean peaks); the gradient flows to the input, as it does to a
LoRA's input through frozen layers.

    python -m bench.bench_compute [--layers 12] [--tokens 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def run_one(mode: str, layers: int, tokens: int, reps: int) -> dict[str, float]:
    import torch

    from lowmem_crosslora.services.compute import UpcastMatmul, bf16_speed
    from lowmem_crosslora.sysmem import host_anon_bytes, tune_allocator

    tune_allocator()  # as refine does: freed blocks go back to the OS, the figure tracks live data
    g = torch.Generator().manual_seed(0)
    shapes = [(4864, 896), (896, 4864)] * (layers // 2)
    wdt = torch.float32 if mode == "fp32" else torch.bfloat16
    ws = [(torch.randn(o, i, generator=g) * i**-0.5).to(wdt) for o, i in shapes]
    x0 = torch.randn(tokens, 896, generator=g)
    base, rss0 = host_anon_bytes(), _status("VmRSS")
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], host_anon_bytes())
            time.sleep(0.002)

    def step() -> None:
        x = (x0.bfloat16() if mode == "bf16" else x0).requires_grad_(True)
        h = x
        for w in ws:
            h = UpcastMatmul.apply(h, w, None) if mode == "upcast" else h @ w.T
            h = torch.nn.functional.silu(h)
        h.float().square().mean().backward()

    step()  # warm-up
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    stop.set()
    th.join()
    hwm = _status("VmHWM")  # the kernel's high-water mark: no sample can miss it

    weights = sum(w.numel() * w.element_size() for w in ws)
    return {
        "mode": mode,
        "step_s": round(min(times), 3),
        "weights_MB": round(weights / 1e6, 1),
        "peak_working_MB": round((peak[0] - base) / 1e6, 1),
        "peak_rss_above_start_MB": round((hwm - rss0) / 1e6, 1),
        "bf16_speed": bf16_speed("cpu").reason,
    }


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.layers, a.tokens, a.reps)))
        return
    for mode in ("bf16", "fp32", "upcast"):
        cmd = [sys.executable, "-m", "bench.bench_compute", "--one", mode, "--layers", str(a.layers), "--tokens", str(a.tokens), "--reps", str(a.reps)]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
