"""The two yardsticks of bench.bench_transfer, each run in its own process.

    python -m bench.reference naive|floor|read --adapter A --source S --target T [--device cuda] [--out DIR]

naive: what a research script does: both state dicts loaded whole with
       safetensors.torch.load_file, torch.svd_lowrank per module, dense dW, dense projection, then a
       rank-k SVD of the dense dW_t to get LoRA factors back.
floor: nothing but the unavoidable work: read each needed base tensor once and run one
       torch.svd_lowrank per base matrix at the same settings as the tool.
read:  reading each needed base tensor once onto the device, widened to float32, and nothing else:
       the physical limit a transfer can approach (issue 18 aims at 3x it on a GPU).

Prints one JSON line: {"seconds": ..., "svd_seconds": ..., "peak_gpu_bytes": ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowmem_crosslora.io.adapter import load_adapter
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.plan import build_plan


def units(adapter: str, source: str, target: str, rank: int):
    ad = load_adapter(adapter)
    src, tgt = Checkpoint(source, "source"), Checkpoint(target, "target")
    plan = build_plan(ad, src, tgt, rank=rank, layer_map="index")
    return ad, src, tgt, plan


def q_for(r: int, m: int, n: int, oversample: int) -> int:
    return min(r + oversample, m, n)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def needed(plan, src, tgt):
    """(checkpoint, tensor name) of every base matrix the plan's units need, each once."""
    seen: set[tuple[str, str]] = set()
    for u in plan.units:
        for role, ck, name in (("source", src, u.source_weight), ("target", tgt, u.target_weight)):
            if (role, name) not in seen:  # both models use the same tensor names: key by model too
                seen.add((role, name))
                yield ck, name


def read(args: argparse.Namespace) -> dict:
    _ad, src, tgt, plan = units(args.adapter, args.source, args.target, args.rank)
    t0 = time.perf_counter()
    n = 0
    for ck, name in needed(plan, src, tgt):
        with safe_open(str(ck.info(name).file), framework="pt") as f:
            W = f.get_tensor(name).to(args.device).float()
        sync(args.device)
        n += 1
        del W
    return {"seconds": time.perf_counter() - t0, "matrices": n}


def floor(args: argparse.Namespace) -> dict:
    ad, src, tgt, plan = units(args.adapter, args.source, args.target, args.rank)
    t0 = time.perf_counter()
    svd_s = 0.0
    seen: set[tuple[str, str]] = set()
    for u in plan.units:
        for role, ck, name in (("source", src, u.source_weight), ("target", tgt, u.target_weight)):
            if (role, name) in seen:  # both models use the same tensor names: key by model too
                continue
            seen.add((role, name))
            info = ck.info(name)
            with safe_open(str(info.file), framework="pt") as f:
                W = f.get_tensor(name).to(args.device).float()
            sync(args.device)
            t1 = time.perf_counter()
            m, n = W.shape
            U, S, V = torch.svd_lowrank(W, q=q_for(u.r, m, n, args.oversample), niter=args.niter)
            sync(args.device)
            svd_s += time.perf_counter() - t1
            del W, U, S, V
    return {"seconds": time.perf_counter() - t0, "svd_seconds": svd_s, "matrices": len(seen)}


def naive(args: argparse.Namespace) -> dict:
    ad, src, tgt, plan = units(args.adapter, args.source, args.target, args.rank)
    t0 = time.perf_counter()
    sd_s: dict[str, torch.Tensor] = {}
    for f in sorted({i.file for i in src.tensors.values()}):
        sd_s.update(load_file(str(f)))
    sd_t: dict[str, torch.Tensor] = {}
    for f in sorted({i.file for i in tgt.tensors.values()}):
        sd_t.update(load_file(str(f)))
    lora = load_file(str(ad.file))
    out: dict[str, torch.Tensor] = {}
    for u in plan.units:
        dev = args.device
        Ws = sd_s[u.source_weight].to(dev).float()
        Wt = sd_t[u.target_weight].to(dev).float()
        qs = q_for(u.r, *Ws.shape, args.oversample)
        qt = q_for(u.r, *Wt.shape, args.oversample)
        Us, _, Vs = torch.svd_lowrank(Ws, q=qs, niter=args.niter)
        Ut, _, Vt = torch.svd_lowrank(Wt, q=qt, niter=args.niter)
        Us, Vs, Ut, Vt = Us[:, : u.r], Vs[:, : u.r], Ut[:, : u.r], Vt[:, : u.r]
        A = lora[u.lora.a_name].to(dev).float()
        B = lora[u.lora.b_name].to(dev).float()
        dW = u.lora.scale * (B @ A)  # dense m x n
        dWt = Ut @ (Us.T @ dW @ Vs) @ Vt.T  # dense m' x n'
        Ub, Sb, Vb = torch.svd_lowrank(dWt, q=u.rank, niter=args.niter)
        out[u.out_b] = (Ub * Sb / u.lora.scale).contiguous().cpu()
        out[u.out_a] = Vb.T.contiguous().cpu()
        del Ws, Wt, dW, dWt
    save_file(out, args.out)
    sync(args.device)
    return {"seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["naive", "floor", "read"])
    p.add_argument("--adapter", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--out", default="/dev/null")
    p.add_argument("--rank", type=int, default=320)
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = {"floor": floor, "naive": naive, "read": read}[args.mode](args)
    result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated()) if args.device.startswith("cuda") else 0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
