"""The transfer command: move one adapter, or a batch of adapters of one source, onto the target.

The work is services/pipeline.py's; this module is the public entry point (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowmem_crosslora.errors import InputError
from lowmem_crosslora.services.factoring import Progress
from lowmem_crosslora.services.pipeline import run_guarded


def transfer(
    adapter: str | Path,
    source: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Transfer a PEFT LoRA adapter from `source` to `target`, writing a PEFT adapter folder at `out`.

    Options are the fields of TransferOptions. Returns the report (also written as
    crosslora_report.json in the output folder). SIGINT and SIGTERM raise Interrupted at the next
    clean point; the hidden state folder next to `out` then resumes with the same call. Warnings
    (the basis cache's: it never fails a transfer) go to `warn`, or to warnings.warn.
    """
    return run_guarded([(adapter, out)], source, target, progress=progress, log=log, warn=warn, batch=False, **options)[0]


def transfer_batch(
    adapters: list[tuple[str | Path, str | Path]],
    source: str | Path,
    target: str | Path,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Transfer several adapters of one source model onto one target: `adapters` lists
    (adapter folder, output folder) pairs. Each base matrix is read and factored once for all of
    them; each output is the same, byte for byte, as a transfer of that adapter alone.

    Every input is checked before any work starts. An output that already holds this very
    transfer (same inputs and options: a rerun of a batch that finished some of its outputs) is
    left as it is and its report returned; interrupted outputs resume. Returns the reports in the
    order given.
    """
    if not adapters:
        raise InputError("no adapter to transfer")
    return run_guarded(adapters, source, target, progress=progress, log=log, warn=warn, batch=True, **options)


def batch_outputs(adapters: tuple[Path, ...], out: Path) -> list[tuple[Path, Path]] | None:
    """(adapter, output) pairs for a batch, or None for a single transfer into --out.

    One --adapter that is an adapter folder is a single transfer. Several, or one folder holding
    adapter folders (no adapter_config.json of its own), are a batch: each adapter goes to
    --out/<its folder name>."""

    if len(adapters) == 1 and ((adapters[0] / "adapter_config.json").exists() or not adapters[0].is_dir()):
        return None
    found: list[Path] = []
    for a in adapters:
        if (a / "adapter_config.json").exists() or not a.is_dir():
            found.append(a)
            continue
        inner = sorted(p for p in a.iterdir() if p.is_dir() and (p / "adapter_config.json").exists())
        if not inner:
            raise InputError(f"adapter {a}: neither an adapter folder (adapter_config.json + adapter_model.safetensors) nor a folder of adapter folders")
        found.extend(inner)
    names: dict[str, Path] = {}
    for a in found:
        name = a.name or a.resolve().name
        if name in names:
            raise InputError(f"adapters {names[name]} and {a} share the folder name {name!r}, so their outputs under {out} would collide; rename one")
        names[name] = a
    return [(a, out / (a.name or a.resolve().name)) for a in found]
