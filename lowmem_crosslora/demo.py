"""The demo: two small models of different families (each with a character tokenizer) and a LoRA
built on the spot (no download), the adapter transferred, and on request verified and refined, each
with its report printed. It composes the commands as a user would; cli.py registers it."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from lowmem_crosslora.commands.refine import run_refine
from lowmem_crosslora.commands.transfer import transfer as run_transfer
from lowmem_crosslora.commands.verify import run_verify
from lowmem_crosslora.console import PATH, progress_printer
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.services.report import summary_lines, verify_lines
from lowmem_crosslora.services.synthetic import DEMO_SOURCE, DEMO_TARGET, write_adapter, write_model, write_tokenizer

DEMO_FOLDERS = ("source-llama", "target-qwen2", "lora-on-llama", "lora-on-qwen2", "lora-on-qwen2-refined", "basis-cache")
# Small settings, so that verify and refine on the demo pair take about a minute on two cores.
DEMO_VERIFY = {"samples": 8, "neutral_samples": 4, "max_new_tokens": 24, "device": "cpu"}
DEMO_REFINE = {"steps": 8, "batch": 4, "samples": 16, "contrast_samples": 4, "holdout": 8, "max_new_tokens": 24, "device": "cpu"}


@click.command()
@click.option("--rank", default=48, show_default=True, type=int, help="SVD rank for the demo.")
@click.option("--keep", type=PATH, default=None, help="Build the demo in this folder (new or empty) and keep it.")
@click.option("--force", is_flag=True, help="With --keep: a folder that is not empty is used anyway; the demo's own folders in it are replaced.")
@click.option("--verify", "do_verify", is_flag=True, help="Then verify the transferred adapter (needs the verify extra: transformers, peft).")
@click.option("--refine", "do_refine", is_flag=True, help="Then refine the adapter onto the target (needs the verify extra).")
@click.option("--quiet", "-q", is_flag=True)
def demo(rank: int, keep: Path | None, force: bool, do_verify: bool, do_refine: bool, quiet: bool) -> None:
    """Build two small models of different families and a LoRA, transfer it, print the report."""

    if keep is not None:
        _check_demo_folder(keep, force)
    with tempfile.TemporaryDirectory(prefix="crosslora-demo-") as tmp:
        root = keep or Path(tmp)
        src, tgt, ad = _build(root)
        out = root / "lora-on-qwen2"
        progress, close = progress_printer(quiet)
        try:
            report = run_transfer(ad, src, tgt, out, progress=progress, rank=rank, device="cpu", force=True, cache_dir=str(root / "basis-cache"))
        finally:
            close()
        _print_units(report)
        where = f"{out}" if keep is not None else "a temporary folder, removed at the end (--keep DIR keeps it)"
        click.echo(f"output folder ({where}): {', '.join(sorted(p.name for p in out.iterdir()))}")
        log = None if quiet else (lambda msg: click.echo(msg, err=True))
        if do_verify:
            for line in verify_lines(run_verify(src, ad, tgt, out, log=log, **DEMO_VERIFY)):
                click.echo(line)
        if do_refine:
            refined = root / "lora-on-qwen2-refined"
            rep = run_refine(src, ad, tgt, refined, log=log, force=True, cache_dir=str(root / "basis-cache"), **DEMO_REFINE)
            s = rep["summary"]
            click.echo(f"refined in {s['seconds']:.0f} s: {s.get('holdout_verdict') or 'no held-out verdict'}")
            click.echo(f"refined folder: {refined if keep is not None else '(temporary)'}")


def _build(root: Path) -> tuple[Path, Path, Path]:
    t0 = time.perf_counter()
    src = write_tokenizer(write_model(root / "source-llama", DEMO_SOURCE, dtype="float32", seed=0, spectrum="decaying"), DEMO_SOURCE.vocab)
    tgt = write_tokenizer(write_model(root / "target-qwen2", DEMO_TARGET, dtype="float32", seed=1, spectrum="decaying"), DEMO_TARGET.vocab)
    ad = write_adapter(root / "lora-on-llama", DEMO_SOURCE, rank=8, alpha=16, seed=2, base=str(src))
    click.echo(
        f"built a {DEMO_SOURCE.model_type} source (hidden {DEMO_SOURCE.hidden}, {DEMO_SOURCE.layers} layers), "
        f"a {DEMO_TARGET.model_type} target (hidden {DEMO_TARGET.hidden}, {DEMO_TARGET.layers} layers) and a rank-8 LoRA "
        f"in {root} ({time.perf_counter() - t0:.1f} s)"
    )
    return src, tgt, ad


def _print_units(report: dict[str, Any]) -> None:
    click.echo(f"{'unit':<8} {'source':<22} {'target':<22} {'r':>4} {'energy':>7}")
    for u in report["units"]:
        click.echo(
            f"{u['uid']:<8} {'L{} {}x{}'.format(u['source_layer'], *u['source_shape']):<22} "
            f"{'L{} {}x{}'.format(u['target_layer'], *u['target_shape']):<22} {u['r']:>4} {u['energy_retained']:>7.3f}"
        )
    for line in summary_lines(report):
        click.echo(line)


def _check_demo_folder(keep: Path, force: bool) -> None:
    """demo --keep writes only into a new or empty folder (or, with --force, replaces only its own folders)."""
    if keep.exists() and not keep.is_dir():
        raise InputError(f"demo --keep {keep}: exists and is not a folder")
    if keep.is_dir() and any(keep.iterdir()):
        if not force:
            raise InputError(f"demo --keep {keep}: the folder is not empty; give a new or empty one, or --force to replace the demo's own folders in it")
        for name in DEMO_FOLDERS:
            if (keep / name).is_dir():
                shutil.rmtree(keep / name)
