"""`plan` and `inspect`: everything that can be said from headers alone, plus a cost estimate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora.architectures import module_shape
from lowmem_crosslora.dtypes import tag_bytes
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.adapter import load_adapter
from lowmem_crosslora.io.checkpoints import open_checkpoint
from lowmem_crosslora.io.gguf_model import GGUFTensor, is_gguf, read_gguf_header
from lowmem_crosslora.io.hub import resolve
from lowmem_crosslora.io.reader import read_json
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.device import resolve_device
from lowmem_crosslora.services.memory import Budget, size_at_least
from lowmem_crosslora.services.options import TransferOptions
from lowmem_crosslora.services.plan import build_plan
from lowmem_crosslora.services.units import run_matrices
from lowmem_crosslora.sizes import format_size


def measured_gflops(device: str = "cpu") -> float:
    """A quick matmul rate on this machine (float32), to turn flop counts into seconds."""
    n, r = 1024, TransferOptions().rank  # a range finder's shape at the default rank
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, r, device=device)
    (a @ b).sum().item()
    t0 = time.perf_counter()
    reps = 8
    for _ in range(reps):
        c = a @ b
    float(c[0, 0])
    dt = max(time.perf_counter() - t0, 1e-6)
    return 2 * n * n * r * reps / dt / 1e9


def svd_flops(m: int, n: int, q: int, niter: int, exact: bool) -> float:
    if exact:
        k = min(m, n)
        return 4.0 * m * n * k + 8.0 * k**3
    passes = 2 * niter + 2
    return 2.0 * m * n * q * passes + 4.0 * (m + n) * q * q * (niter + 1)


def plan_summary(adapter: Path, source: Path, target: Path, **options: Any) -> dict[str, Any]:
    """What a transfer with these options (TransferOptions' fields) would do and cost; reads headers only."""
    opts = TransferOptions(**options)
    settings = opts.svd_settings()
    ad = load_adapter(adapter, allow_pickle=opts.allow_pickle)
    src = open_checkpoint(source, "source")
    tgt = open_checkpoint(target, "target")
    plan = build_plan(ad, src, tgt, rank=opts.rank, layer_map=opts.layer_map, dtype=opts.dtype, target_format=opts.target_format)
    device = resolve_device(opts.device)
    budget = Budget(opts.max_memory, opts.max_gpu_memory, device)
    # The matrices the run would factor, in its order, with the bases it would hold beside each: the
    # planner sees what the run's planner sees, and names the budget the run would name.
    scheduled = run_matrices(plan.units, src, tgt, settings)
    budget.run_matrices = matrices = [mat for _, mat in scheduled]
    held_at = {key: mat[5] for key, mat in scheduled}
    gflops = measured_gflops("cpu" if device == "mps" else device)
    units = []
    seen: set[str] = set()
    total_seconds = 0.0
    peak = 0
    for u in plan.units:
        d = u.to_json()
        svd: dict[str, str] = {}
        secs = 0.0
        for role, ckpt, name, (m, n) in (("source", src, u.source_weight, u.source_shape), ("target", tgt, u.target_weight, u.target_shape)):
            q = settings.q_for(u.r, m, n)
            if role == "source" and name in seen:
                svd[role] = "reused"
                continue
            seen.add(name)
            exact = settings.uses_exact(u.r, m, n, device)
            held = held_at[f"source:{name}" if role == "source" else f"target:{u.uid}"]
            mp = budget.plan_matrix(m, n, q, u.r, ckpt.info(name).dtype, retained=held, held=held)
            svd[role] = ("exact" if exact and mp.mode == "in-core" else "randomized") + ("" if mp.mode == "in-core" else f" blocked/{mp.block_rows}")
            secs += svd_flops(m, n, q, settings.niter, exact and mp.mode == "in-core") / (gflops * 1e9)
            peak = max(peak, mp.host_bytes)
        d["svd"] = svd
        d["estimated_seconds"] = round(secs, 3)
        total_seconds += secs
        units.append(d)
    need = budget.smallest_for(matrices)
    return {
        "units": units,
        "skipped": plan.skipped,
        "warnings": plan.warnings,
        "target_modules": plan.target_modules,
        "output_dtype": plan.out_dtype,
        "estimate": {
            "device": device,
            "gflops": round(gflops, 1),
            "seconds": round(total_seconds, 1),
            "base_matrices": len(seen) + len(plan.units),
            "peak_working": format_size(peak),
            "peak_working_bytes": peak,
            "baseline_host": format_size(budget.baseline),
            "baseline_host_bytes": budget.baseline,
            "host_budget": format_size(budget.limit),
            "min_host_budget": size_at_least(need),
            "min_host_budget_bytes": need,
            "min_working": size_at_least(budget.smallest_working(matrices)),
        },
    }


def describe(path: Path) -> dict[str, Any]:
    """Model or adapter folder (or a hub id in the local Hugging Face cache) -> a flat description."""

    path = resolve(path, "path")
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if (path / "adapter_config.json").exists():
        ad = load_adapter(path)
        mods = sorted({m.module.split(".")[-1] for m in ad.modules.values()})
        layers = sorted({int(p) for m in ad.modules.values() for p in m.module.split(".") if p.isdigit()})
        ranks = sorted({m.rank for m in ad.modules.values()})
        return {
            "kind": "adapter",
            "path": str(path),
            "peft_type": ad.config.get("peft_type", "LORA"),
            "base_model": ad.config.get("base_model_name_or_path"),
            "r": ad.default_rank,
            "lora_alpha": ad.default_alpha,
            "use_rslora": ad.use_rslora,
            "ranks": ranks,
            "modules": mods,
            "layers": f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "-",
            "lora_modules": len(ad.modules),
            "dtype": sorted({m.dtype for m in ad.modules.values()}),
            "rank_pattern": ad.config.get("rank_pattern") or {},
            "alpha_pattern": ad.config.get("alpha_pattern") or {},
            "skipped": ad.skipped,
        }

    if is_gguf(path):
        meta, tensors = read_gguf_header(path, f"GGUF {path}")
        if meta.get("general.type") == "adapter":
            return _describe_lora_gguf(path, meta, tensors)
    if is_gguf(path) or (path / "config.json").exists():
        ck = open_checkpoint(path, "model")
        d = ck.dims
        dtypes: dict[str, int] = {}
        nbytes = 0
        for t in ck.tensors.values():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
            count = 1
            for s in t.shape:
                count *= s
            nbytes += count * tag_bytes(t.dtype) if isinstance(ck, Checkpoint) else ck.entry(t.name).nbytes
        fam = ck.family

        return {
            "kind": "model",
            "path": str(path),
            "model_type": ck.config.get("model_type"),
            "layers": d.num_layers,
            "hidden": d.hidden,
            "intermediate": d.intermediate,
            "heads": d.num_heads,
            "kv_heads": d.num_kv_heads,
            "head_dim": d.head_dim,
            "layer_prefix": ck.layer_prefix,
            "modules": {name: list(module_shape(fam, d, name)) for name in fam.modules},
            "tensors": len(ck.tensors),
            "dtypes": dtypes,
            "size": format_size(nbytes),
            "files": len(ck._headers) if isinstance(ck, Checkpoint) else 1,
        }
    try:
        read_json(path / "config.json", "inspect")
    except InputError:
        pass
    raise InputError(f"{path}: neither a model folder (config.json) nor an adapter folder (adapter_config.json)")


def _describe_lora_gguf(path: Path, meta: dict[str, Any], tensors: list[GGUFTensor]) -> dict[str, Any]:
    """A llama.cpp LoRA adapter GGUF (what `--out-format gguf` writes): its architecture, alpha, and
    the modules, layers and ranks of its lora_a / lora_b pairs."""
    a = {t.gguf_name[: -len(".lora_a")]: t for t in tensors if t.gguf_name.endswith(".lora_a")}
    b = {t.gguf_name[: -len(".lora_b")]: t for t in tensors if t.gguf_name.endswith(".lora_b")}
    names = sorted(set(a) | set(b))
    layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()})
    return {
        "kind": "lora-gguf",
        "path": str(path),
        "architecture": meta.get("general.architecture"),
        "adapter_type": meta.get("adapter.type"),
        "lora_alpha": meta.get("adapter.lora.alpha"),
        "ranks": sorted({t.shape[0] for t in a.values()}),
        "modules": sorted({n.split(".")[2] if n.startswith("blk.") else n for n in names}),
        "layers": f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "-",
        "lora_modules": len(names),
        "unpaired": sorted(set(a) ^ set(b)),
        "dtype": sorted({t.type_name for t in tensors}),
        "bytes": sum(t.nbytes for t in tensors),
    }
