"""crosslora_report.json: what was transferred, what was skipped and why, and what it cost."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem_crosslora.io.reader import CheckpointReader
from lowmem_crosslora.services.memory import Budget
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


TRANSFER_NOTE = (
    "energy_retained is ||U_s^T dW V_s||_F / ||dW||_F, the share of the adapter's update inside the rank-r "
    "subspaces of the source weights. It is not a measure of behaviour: across model families the transfer "
    "keeps energy far better than it keeps what the adapter does."
)
VERIFY_NOTE = (
    "recovery = target effect / source effect on the same texts. A random adapter of realistic size also moves "
    "log-likelihood (it flattens the distribution), so judge the transferred adapter against the random control "
    "of the same per-module norms: target_minus_control and its z are the test."
)
REFINE_NOTE = (
    "refine trained this adapter on the probe texts named in probe_set (kept in refine_probes.json). "
    "Scores on those texts say nothing about the task: grade it with verify, which samples fresh texts. "
    "The step written is the one that did best on held-out texts (holdout; never trained on), against a random "
    "control of the same per-module norms; carries_behaviour false says that no step beat that control."
)
# Options that say how a transfer ran, not what it made: left out of its report.
RUN_ONLY_OPTIONS = ("resume", "restart", "force")


@dataclass
class Parts:
    """What one kind of report puts into the shared frame, each dict at its place in the frame:
    top-level fields before the models (`head`) and after the options (`tail`), the summary's
    headline (`summary`), fields after its seconds (`timing`) and after its device (`run`), its
    closing fields (`closing`; None: the budget's warnings), the kind's own sections (`body`)."""

    summary: dict[str, Any]
    body: dict[str, Any]
    note: str
    head: dict[str, Any] = field(default_factory=dict)
    tail: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    closing: dict[str, Any] | None = None


def build_report(
    kind: str,
    *,
    adapter: str | Path,
    source: CheckpointReader,
    target: CheckpointReader,
    options: dict[str, Any],
    device: str,
    seconds: float,
    phases: dict[str, float],
    budget: Budget,
    version: str,
    **parts: Any,
) -> dict[str, Any]:
    """The report of a transfer, verify or refine run (schema lowmem-crosslora/report/1): the shared
    frame (tool, version, kind, models, options, timing, memory, warnings) around the kind's own
    parts, which `parts` holds (see transfer_parts, verify_parts and refine_parts)."""
    if kind not in PARTS:
        raise ValueError(f"unknown report kind {kind!r}")
    if kind == "transfer":
        options = {k: v for k, v in options.items() if k not in RUN_ONLY_OPTIONS}
    p = PARTS[kind](**parts)
    closing = p.closing if p.closing is not None else {"warnings": [budget.exceeded] if budget.exceeded else []}
    return {
        "schema": SCHEMA,
        "tool": "lowmem-crosslora",
        "version": version,
        "kind": kind,
        "adapter": str(adapter),
        **p.head,
        "source": model_info(source),
        "target": model_info(target),
        "options": options,
        **p.tail,
        "summary": {
            **p.summary,
            "seconds": round(seconds, 3),
            **p.timing,
            "device": device,
            **p.run,
            **memory_summary(budget, phases),
            **closing,
        },
        **p.body,
        "note": p.note,
    }


def transfer_parts(*, plan: Plan, records: list[dict[str, Any]], fallbacks: list[str], resumed_units: int) -> Parts:
    """A transfer: energy retained per unit and module, what was skipped, the engine's fallbacks."""
    energies = [r["energy_retained"] for r in records if r.get("energy_retained") is not None]
    by_module: dict[str, list[float]] = {}
    for r in records:
        if r.get("energy_retained") is not None:
            by_module.setdefault(r["module"], []).append(r["energy_retained"])
    summary = {
        "units": len(records),
        "skipped": len(plan.skipped),
        "resumed_units": resumed_units,
        "energy_retained": energy_summary(energies),
        "energy_retained_by_module": {k: round(statistics.fmean(v), 6) for k, v in sorted(by_module.items())},
    }
    return Parts(summary, {"units": records, "skipped": plan.skipped}, TRANSFER_NOTE, closing={"fallbacks": fallbacks})


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
    lines.append(f"{host_memory_line(s)}; {format_size(s['peak_mapped_file_bytes'])} of mapped files (reclaimable)" + gpu_memory_text(s))
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


def model_info(ckpt: CheckpointReader) -> dict[str, Any]:
    return {"path": str(ckpt.path), "model_type": ckpt.config.get("model_type"), "layers": ckpt.dims.num_layers, "hidden": ckpt.dims.hidden}


def _norm_summary(norms: dict[str, float]) -> dict[str, float | int]:
    return {"modules": len(norms), "total": round(sum(v * v for v in norms.values()) ** 0.5, 6)}


def host_memory_line(s: dict[str, Any]) -> str:
    """The peak private memory and its split, against the whole-process budget."""
    return (
        f"peak host memory: {format_size(s['peak_host_bytes'])} private = {format_size(s['baseline_host_bytes'])} for Python and the "
        f"libraries + {format_size(s['peak_working_bytes'])} working (--max-memory {format_size(s['host_budget_bytes'])}, whole process)"
    )


def gpu_memory_text(s: dict[str, Any]) -> str:
    """'; peak GPU ...' with what it counts, or nothing when no GPU was used."""
    if not s.get("peak_gpu_bytes"):
        return ""
    ctx = s.get("gpu_context_bytes") or 0
    counts = f"CUDA context and workspaces {format_size(ctx)} of it" if ctx else "torch's reserved blocks: the driver did not report the CUDA context"
    return f"; peak GPU {format_size(s['peak_gpu_bytes'])} ({counts}; --max-gpu-memory {format_size(s.get('gpu_budget_bytes') or 0)})"


def memory_summary(budget: Budget, phases: dict[str, float]) -> dict[str, Any]:
    """The peak-memory and phase-time fields every report's summary holds."""
    return {
        "peak_host_bytes": budget.peak_host,
        "baseline_host_bytes": budget.baseline,
        "peak_working_bytes": budget.peak_working,
        "host_budget_bytes": budget.limit,
        "peak_mapped_file_bytes": budget.peak_file,
        "peak_gpu_bytes": budget.peak_gpu,
        "gpu_baseline_bytes": budget.gpu_baseline,
        "gpu_context_bytes": budget.gpu_context,
        "gpu_budget_bytes": budget.max_gpu,
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
    }


def verify_parts(
    *,
    transferred: str | Path,
    sets: dict[str, dict[str, Any]],
    records: list[dict[str, Any]],
    norms: dict[str, dict[str, float]],
    dtypes: dict[str, str],
) -> Parts:
    """verify: the measurements in `verify` (one entry per text set), the scored texts in `texts`."""
    head = next(iter(sets.values()), None)
    summary = {"verdict": head["verdict"] if head else None, "recovery": head["recovery"] if head else None, "texts": len(records)}
    body = {
        "verify": {
            "units": "log-likelihood per UTF-8 byte (nats); an effect is the change it makes, positive = more likely",
            "sets": sets,
            "adapter_norms": {k: _norm_summary(v) for k, v in norms.items()},
        },
        "texts": records,
    }
    return Parts(summary, body, VERIFY_NOTE, head={"transferred": str(transferred)}, run={"dtypes": dtypes})


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
    lines.append(host_memory_line(s) + gpu_memory_text(s))
    for w in s.get("warnings", []):
        lines.append(f"warning: {w}")
    return lines


def refine_parts(
    *,
    objective: str,
    init: str,
    probe_set: dict[str, Any],
    losses: list[dict[str, float]],
    shape: dict[str, Any],
    modules: int,
    lora_params: int,
    dtypes: dict[str, str],
    train_seconds: float,
    fingerprint: str,
    holdout: dict[str, Any] | None = None,
) -> Parts:
    """refine: what it trained on (the probe set, with its seed), the objective, the steps and their
    losses, and the held-out evaluations that chose the step written (None: --holdout 0)."""
    summary = {
        "objective": objective,
        "init": init,
        "steps": len(losses),
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "modules": modules,
        "lora_parameters": lora_params,
        # None: not measured (no held-out texts); False: no step beat the random control on them
        "carries_behaviour": None if holdout is None else holdout["carries_behaviour"],
        "written_step": len(losses) if holdout is None else holdout["written_step"],
        "stopped_early": False if holdout is None else holdout["stopped_early"],
        "holdout_verdict": "not measured (--holdout 0)" if holdout is None else holdout["verdict"],
    }
    return Parts(
        summary,
        {"refine": {"probe_set": probe_set, "holdout": holdout, "losses": losses}},
        REFINE_NOTE,
        tail={"run_fingerprint": fingerprint},
        timing={"train_seconds": round(train_seconds, 3)},
        run={"dtypes": dtypes, "train_shape": shape},
    )


PARTS: dict[str, Callable[..., Parts]] = {"transfer": transfer_parts, "verify": verify_parts, "refine": refine_parts}
