"""crosslora_report.json: what was transferred, what was skipped and why, and what it cost."""

from __future__ import annotations

import statistics
from typing import Any

from lowmem_crosslora.io.adapter import Adapter
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.plan import Plan
from lowmem_crosslora.sizes import format_size

SCHEMA = "lowmem-crosslora/report/1"


def energy_summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min": None, "max": None, "median": None}
    return {
        "mean": round(statistics.fmean(values), 6),
        "min": round(min(values), 6),
        "max": round(max(values), 6),
        "median": round(statistics.median(values), 6),
    }


def build_report(
    *,
    plan: Plan,
    records: list[dict[str, Any]],
    adapter: Adapter,
    source: Checkpoint,
    target: Checkpoint,
    options: dict[str, Any],
    device: str,
    seconds: float,
    peak_host: int,
    peak_file: int,
    peak_gpu: int,
    baseline_host: int,
    gpu_baseline: int = 0,
    phases: dict[str, float] | None = None,
    budget_host: int,
    fallbacks: list[str],
    resumed_units: int,
    version: str,
) -> dict[str, Any]:
    energies = [r["energy_retained"] for r in records if r.get("energy_retained") is not None]
    by_module: dict[str, list[float]] = {}
    for r in records:
        if r.get("energy_retained") is not None:
            by_module.setdefault(r["module"], []).append(r["energy_retained"])
    return {
        "schema": SCHEMA,
        "tool": "lowmem-crosslora",
        "version": version,
        "kind": "transfer",
        "adapter": str(adapter.path),
        "source": {"path": str(source.path), "model_type": source.config.get("model_type"), "layers": source.dims.num_layers, "hidden": source.dims.hidden},
        "target": {"path": str(target.path), "model_type": target.config.get("model_type"), "layers": target.dims.num_layers, "hidden": target.dims.hidden},
        "options": {k: v for k, v in options.items() if k not in ("resume", "restart", "force")},
        "summary": {
            "units": len(records),
            "skipped": len(plan.skipped),
            "resumed_units": resumed_units,
            "energy_retained": energy_summary(energies),
            "energy_retained_by_module": {k: round(statistics.fmean(v), 6) for k, v in sorted(by_module.items())},
            "seconds": round(seconds, 3),
            "device": device,
            "peak_host_bytes": peak_host,
            "baseline_host_bytes": baseline_host,
            "peak_working_bytes": max(0, peak_host - baseline_host),
            "host_budget_bytes": budget_host,
            "peak_mapped_file_bytes": peak_file,
            "peak_gpu_bytes": peak_gpu,
            "gpu_baseline_bytes": gpu_baseline,
            "phase_seconds": {k: round(v, 3) for k, v in (phases or {}).items()},
            "fallbacks": fallbacks,
        },
        "units": records,
        "skipped": plan.skipped,
        "note": (
            "energy_retained is ||U_s^T dW V_s||_F / ||dW||_F, the share of the adapter's update inside the rank-r "
            "subspaces of the source weights. It is not a measure of behaviour: across model families the transfer "
            "keeps energy far better than it keeps what the adapter does."
        ),
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    e = s["energy_retained"]
    lines = [
        f"transferred {s['units']} modules from {report['source']['model_type']} ({report['source']['layers']} layers) "
        f"to {report['target']['model_type']} ({report['target']['layers']} layers) in {s['seconds']:.1f} s on {s['device']}"
        + (f" ({s['resumed_units']} done by an earlier run)" if s.get("resumed_units") else ""),
    ]
    if e["mean"] is not None:
        lines.append(f"energy retained: mean {e['mean']:.3f}, min {e['min']:.3f}, max {e['max']:.3f}")
        per = ", ".join(f"{k} {v:.3f}" for k, v in s["energy_retained_by_module"].items())
        lines.append(f"  by module: {per}")
    lines.append(
        f"peak host memory: {format_size(s['peak_working_bytes'])} working (budget {format_size(s['host_budget_bytes'])}) "
        f"+ {format_size(s['baseline_host_bytes'])} for Python and torch = {format_size(s['peak_host_bytes'])} private; "
        f"{format_size(s['peak_mapped_file_bytes'])} of mapped files (reclaimable)"
        + (f"; peak GPU {format_size(s['peak_gpu_bytes'])}" if s.get("peak_gpu_bytes") else "")
    )
    if s["skipped"]:
        reasons: dict[str, int] = {}
        for item in report["skipped"]:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        lines.append(f"skipped {s['skipped']} tensors:")
        lines.extend(f"  {n} x {reason}" for reason, n in sorted(reasons.items()))
    c = s.get("cache")
    if c:
        lines.append(f"basis cache: {c['hits']} bases read, {c['stored']} computed and stored ({c['dir']})")
    for f in s.get("fallbacks", []):
        lines.append(f"fallback: {f}")
    lines.append("energy retained is not behaviour: measure the transferred adapter before trusting it.")
    return lines


def model_info(ckpt: Checkpoint) -> dict[str, Any]:
    return {"path": str(ckpt.path), "model_type": ckpt.config.get("model_type"), "layers": ckpt.dims.num_layers, "hidden": ckpt.dims.hidden}


def _norm_summary(norms: dict[str, float]) -> dict[str, float | int]:
    return {"modules": len(norms), "total": round(sum(v * v for v in norms.values()) ** 0.5, 6)}


def memory_summary(budget: Any, phases: dict[str, float]) -> dict[str, Any]:
    """The peak-memory and phase-time fields shared by the verify and refine summaries."""
    return {
        "peak_host_bytes": budget.peak_host,
        "baseline_host_bytes": budget.baseline,
        "peak_working_bytes": budget.peak_working,
        "host_budget_bytes": budget.max_host,
        "peak_mapped_file_bytes": budget.peak_file,
        "peak_gpu_bytes": budget.peak_gpu,
        "gpu_baseline_bytes": budget.gpu_baseline,
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
    }


def build_verify_report(
    *,
    source: Checkpoint,
    target: Checkpoint,
    adapter: str,
    transferred: str,
    options: dict[str, Any],
    sets: dict[str, dict[str, Any]],
    records: list[dict[str, Any]],
    norms: dict[str, dict[str, float]],
    dtypes: dict[str, str],
    device: str,
    seconds: float,
    phases: dict[str, float],
    budget: Any,
    version: str,
) -> dict[str, Any]:
    """The verify report: the transfer report's schema and summary conventions, kind "verify"; the
    measurements sit in `verify` (one entry per text set), the scored texts in `texts`."""
    head = next(iter(sets.values()), None)
    warnings = []
    if budget.exceeded:
        warnings.append(budget.exceeded)
    return {
        "schema": SCHEMA,
        "tool": "lowmem-crosslora",
        "version": version,
        "kind": "verify",
        "adapter": adapter,
        "transferred": transferred,
        "source": model_info(source),
        "target": model_info(target),
        "options": options,
        "summary": {
            "verdict": head["verdict"] if head else None,
            "recovery": head["recovery"] if head else None,
            "texts": len(records),
            "seconds": round(seconds, 3),
            "device": device,
            "dtypes": dtypes,
            **memory_summary(budget, phases),
            "warnings": warnings,
        },
        "verify": {
            "units": "log-likelihood per UTF-8 byte (nats); an effect is the change it makes, positive = more likely",
            "sets": sets,
            "adapter_norms": {k: _norm_summary(v) for k, v in norms.items()},
        },
        "texts": records,
        "note": (
            "recovery = target effect / source effect on the same texts. A random adapter of realistic size also moves "
            "log-likelihood (it flattens the distribution), so judge the transferred adapter against the random control "
            "of the same per-module norms: target_minus_control and its z are the test."
        ),
    }


def verify_lines(report: dict[str, Any]) -> list[str]:
    """The verify table and verdicts, for a terminal."""
    s = report["summary"]
    v = report["verify"]
    lines = [
        f"verify: {report['source']['model_type']} + adapter -> {report['target']['model_type']} + transferred, "
        f"{s['texts']} texts, {s['seconds']:.1f} s on {s['device']}",
        "effects in nats per byte (change in log-likelihood, +/- one standard error over texts):",
        f"  {'texts':<34} {'n':>3} {'source':>17} {'target':>17} {'control':>17} {'target-control':>17} {'recovery':>13}",
    ]

    def pm(e: dict[str, Any], scale: float = 1.0, fmt: str = "+.4f") -> str:
        if e["mean"] is None:
            return "n/a"
        se = "" if e["se"] is None else f" +/- {e['se'] * scale:{fmt.lstrip('+')}}"
        return f"{e['mean'] * scale:{fmt}}{se}"

    names = {"adapter": "samples of source + adapter", "base": "neutral (source base samples)", "user": "--texts"}
    for key, e in v["sets"].items():
        lines.append(
            f"  {names.get(key, key):<34} {e['texts']:>3} {pm(e['source_effect']):>17} {pm(e['target_effect']):>17} "
            f"{pm(e['control_effect']):>17} {pm(e['target_minus_control']):>17} {pm(e['recovery'], 100, '.0f') + '%':>13}"
        )
    n = v["adapter_norms"]
    lines.append(
        f"adapter norms ||s B A||_F (all modules): source {n['source']['total']:.4g}, transferred {n['transferred']['total']:.4g}, "
        f"control {n['control']['total']:.4g}"
    )
    for e in v["sets"].values():
        lines.append(e["verdict"])
    lines.append(
        f"peak host memory: {format_size(s['peak_working_bytes'])} working (budget {format_size(s['host_budget_bytes'])}) "
        f"+ {format_size(s['baseline_host_bytes'])} for Python and the libraries = {format_size(s['peak_host_bytes'])} private"
        + (f"; peak GPU {format_size(s['peak_gpu_bytes'])}" if s.get("peak_gpu_bytes") else "")
    )
    for w in s.get("warnings", []):
        lines.append(f"warning: {w}")
    return lines


def build_refine_report(
    *,
    source: Checkpoint,
    target: Checkpoint,
    adapter: str,
    options: dict[str, Any],
    objective: str,
    init: str,
    probe_set: dict[str, Any],
    losses: list[dict[str, float]],
    shape: dict[str, Any],
    modules: int,
    lora_params: int,
    dtypes: dict[str, str],
    device: str,
    seconds: float,
    train_seconds: float,
    phases: dict[str, float],
    budget: Any,
    fingerprint: str,
    version: str,
) -> dict[str, Any]:
    """The refine report: the transfer report's schema and summary conventions, kind "refine"; what it
    trained on (the probe set, with its seed), the objective, the steps and their losses."""
    warnings = [budget.exceeded] if budget.exceeded else []
    return {
        "schema": SCHEMA,
        "tool": "lowmem-crosslora",
        "version": version,
        "kind": "refine",
        "adapter": adapter,
        "source": model_info(source),
        "target": model_info(target),
        "options": options,
        "run_fingerprint": fingerprint,
        "summary": {
            "objective": objective,
            "init": init,
            "steps": len(losses),
            "first_loss": losses[0]["loss"] if losses else None,
            "final_loss": losses[-1]["loss"] if losses else None,
            "modules": modules,
            "lora_parameters": lora_params,
            "seconds": round(seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "device": device,
            "dtypes": dtypes,
            "train_shape": shape,
            **memory_summary(budget, phases),
            "warnings": warnings,
        },
        "refine": {"probe_set": probe_set, "losses": losses},
        "note": (
            "refine trained this adapter on the probe texts named in probe_set (kept in refine_probes.json). "
            "Scores on those texts say nothing about the task: grade it with verify, which samples fresh texts."
        ),
    }
