"""Command line: transfer, plan, inspect, verify, refine, demo. Exit codes: 0 done, 1 unexpected, 2 bad input, 3 budget.

Every command option's default and help text is a field of services/options.py's dataclasses, added
here by `click_options`; this module only adds the inputs and outputs, dispatches and prints."""

from __future__ import annotations

import json
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click

from lowmem_crosslora.commands.bases import precompute_bases
from lowmem_crosslora.commands.inspect import describe, plan_summary
from lowmem_crosslora.commands.refine import run_refine
from lowmem_crosslora.commands.transfer import batch_outputs, transfer_batch
from lowmem_crosslora.commands.transfer import transfer as run_transfer
from lowmem_crosslora.commands.verify import run_verify
from lowmem_crosslora.console import PATH, Decorator, progress_printer, stack, warn
from lowmem_crosslora.demo import demo
from lowmem_crosslora.errors import CrossLoraError, InputError, Interrupted
from lowmem_crosslora.io.runstate import check_report_path
from lowmem_crosslora.migrate.command import migrate_command
from lowmem_crosslora.services.cache import BasisCache
from lowmem_crosslora.services.options import BasesOptions, CacheOptions, RefineOptions, TransferOptions, VerifyOptions, click_options
from lowmem_crosslora.services.probes import read_prompts
from lowmem_crosslora.services.report import summary_lines, verify_lines
from lowmem_crosslora.sizes import format_size
from lowmem_crosslora.version import __version__


def _path(name: str, help: str, dest: str | None = None, **kw: Any) -> Decorator:
    return click.option(name, *([dest] if dest else []), required=True, type=PATH, help=help, **kw)


def _json(help: str) -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def _report(help: str = "Also write the report JSON here.") -> Decorator:
    return click.option("--report", "report_path", default=None, type=PATH, help=help)


_quiet = click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")

ADAPTER_HELP = "PEFT LoRA adapter folder trained on the source model."
BATCH_ADAPTER_HELP = (
    f"{ADAPTER_HELP} Repeat it, or give a folder of adapter folders, to transfer several in one run: each base matrix "
    "is then read and factored once for all of them, and each goes to --out/<adapter folder name>."
)
BASE_HELP = "{} base model: a folder (config.json + safetensors) or a .gguf."
TOKENIZER_BASE_HELP = "{} base model folder (with its tokenizer)."
# The TransferOptions that transfer and plan share, in the order --help lists them.
TRANSFER_MODEL = ("rank", "layer_map", "dtype", "device", "max_memory", "max_gpu_memory", "seed", "oversample", "niter", "compute_dtype", "target_format")


def common_inputs(f: Callable[..., Any], batch: bool = False) -> Callable[..., Any]:
    adapter = _path("--adapter", BATCH_ADAPTER_HELP, "adapters", multiple=True) if batch else _path("--adapter", ADAPTER_HELP)
    return stack(
        adapter,
        _path("--source", BASE_HELP.format("Source")),
        _path("--target", BASE_HELP.format("Target")),
        click_options(TransferOptions, only=(*TRANSFER_MODEL, "allow_pickle")),
    )(f)


# The options refine adds (shared by `refine` and `transfer --refine`); --texts is an input of its own.
REFINE_RUN = ("steps", "lr", "batch", "samples", "contrast_samples", "holdout", "patience", "max_new_tokens", "prompts")
REFINE_SHAPE = ("lora_rank", "lora_alpha")
REFINE_KEYS = ("steps", "lr", "batch", "samples", "contrast_samples", "holdout", "patience", "max_new_tokens", "prompts_file", "texts_file", *REFINE_SHAPE)
refine_options = stack(
    click_options(RefineOptions, only=REFINE_RUN),
    click.option("--texts", "texts_file", default=None, type=PATH, help='Your own texts of the adapter\'s kind too: .jsonl ({"text": ...}) or plain text.'),
    click_options(RefineOptions, only=REFINE_SHAPE),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowmem-crosslora")
def cli() -> None:
    """Move a LoRA adapter onto a different base model (Cross-LoRA), data-free, in bounded memory."""


@cli.command()
@partial(common_inputs, batch=True)
@click.option(
    "--out",
    required=True,
    type=PATH,
    help="Output adapter folder (created; must be empty unless --force). With several adapters: the folder that receives one output folder per adapter.",
)
@click_options(TransferOptions, only=("resume", "restart", "force", "out_format", "stack"))
@_report("Also write the report JSON here (a list of reports for several adapters).")
@_quiet
@_json("Print the report as JSON on stdout (a list of reports for several adapters).")
@click_options(TransferOptions, only=("cache_dir", "cache_limit", "use_cache"))
@click.option(
    "--refine",
    "do_refine",
    is_flag=True,
    help="Then distil the adapter's behaviour into the output with `refine` (see its options below; the paper's transfer alone keeps energy, not behaviour).",
)
@refine_options
def transfer(
    adapters: tuple[Path, ...], source: Path, target: Path, out: Path, report_path: Path | None, quiet: bool, as_json: bool, do_refine: bool, **kw: Any
) -> None:
    """Transfer --adapter from --source onto --target, writing a PEFT adapter folder at --out."""

    check_report_path(report_path, [*adapters, source, target, out])
    pairs = batch_outputs(adapters, out)
    refine_kw = {k: kw.pop(k) for k in REFINE_KEYS}
    if do_refine:
        if pairs is not None:
            raise InputError("--refine takes one --adapter (it trains on the target, one adapter at a time)")
        if kw["out_format"] != "peft" or kw["target_format"] != "peft":
            raise InputError("--refine writes a PEFT folder: drop --out-format and --for, or convert the refined folder afterwards")
        keep = {k: kw[k] for k in ("rank", "layer_map", "seed", "device", "max_memory", "max_gpu_memory", "cache_dir", "restart", "force")}
        _run_refine_cli(source, adapters[0], target, out, quiet, as_json, report_path, {**refine_kw, **keep})
        return
    progress, close = progress_printer(quiet or as_json)
    log = (lambda msg: click.echo(msg, err=True)) if not quiet else None
    try:
        if pairs is None:
            result: Any = run_transfer(adapters[0], source, target, out, progress=progress, log=log, warn=warn, **kw)
            reports = [result]
        else:
            result = reports = transfer_batch(pairs, source, target, progress=progress, log=log, warn=warn, **kw)
    finally:
        close()
    if report_path is not None:
        report_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    elif not quiet and pairs is None:
        for line in summary_lines(reports[0]):
            click.echo(line)
        click.echo(f"wrote {out}")
    elif not quiet and pairs is not None:
        _print_batch(pairs, reports)


def _print_batch(pairs: list[tuple[Path, Path]], reports: list[dict[str, Any]]) -> None:
    for (_, o), rep in zip(pairs, reports, strict=True):
        e = rep["summary"]["energy_retained"]
        energy = f"energy retained mean {e['mean']:.3f}" if e["mean"] is not None else "no energy figure"
        click.echo(f"wrote {o}: {rep['summary']['units']} modules, {energy}")
    s = reports[-1]["summary"]
    c = s.get("cache")
    click.echo(
        f"{len(reports)} adapters in {s['seconds']:.1f} s on {s['device']}, each base matrix factored once"
        + (f"; basis cache: {c['hits']} bases read, {c['stored']} computed and stored" if c else "")
    )
    click.echo("energy retained is not behaviour: measure the transferred adapters before trusting them.")


@cli.command()
@click.argument("model", type=PATH)
@click_options(BasesOptions)
@_quiet
@_json("Print the summary as JSON.")
def bases(model: Path, quiet: bool, as_json: bool, **kw: Any) -> None:
    """Precompute MODEL's SVD factors (q, k, v, o, gate, up, down of every layer) into the basis cache,
    so that a later transfer with the same --rank, --seed, SVD settings and device type only projects."""

    progress, close = progress_printer(quiet or as_json, label="bases")
    try:
        summary = precompute_bases(model, progress=progress, warn=warn, **kw)
    finally:
        close()
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    elif not quiet:
        c = summary["cache"]
        how = ", ".join(f"{v} {k}" for k, v in summary["methods"].items())
        click.echo(f"{summary['matrices']} matrices of {summary['model']} in {summary['seconds']:.1f} s ({how})")
        click.echo(f"cache {c['dir']}: {c['stored']} stored, {c['hits']} already there")


@cli.group()
def cache() -> None:
    """The basis cache: list, prune or clear stored SVD factors."""


def _open_cache(cache_dir: str | None) -> Any:
    return BasisCache(cache_dir, warn=warn)


@cache.command("ls")
@click_options(CacheOptions, only=("cache_dir",))
@_json("Print as JSON.")
def cache_ls(cache_dir: str | None, as_json: bool) -> None:
    """List the entries, least recently used first, and the total size."""

    c = _open_cache(cache_dir)
    rows = [c.describe(e) for e in c.entries()]
    total = sum(r["size"] for r in rows)
    if as_json:
        click.echo(json.dumps({"dir": str(c.root), "entries": rows, "total_bytes": total}, indent=2, sort_keys=True))
        return
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) if r["shape"] else "?"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
        click.echo(f"{used}  {format_size(r['size']):>10}  r={r['r'] or '?':<4} {shape:<11} {r['method'] or '?':<12} {r['tensor'] or r['file']}")
    click.echo(f"{len(rows)} entries, {format_size(total)} in {c.root}")


@cache.command("prune")
@click_options(CacheOptions)
def cache_prune(cache_dir: str | None, max_size: int) -> None:
    """Evict least recently used entries down to --max-size."""

    c = _open_cache(cache_dir)
    removed = c.prune(max_size)
    left = sum(e.size for e in c.entries())
    click.echo(f"removed {len(removed)} entries; {format_size(left)} left in {c.root}")


@cache.command("clear")
@click_options(CacheOptions, only=("cache_dir",))
def cache_clear(cache_dir: str | None) -> None:
    """Delete every entry."""
    c = _open_cache(cache_dir)
    n = c.clear()
    click.echo(f"removed {n} entries from {c.root}")


@cli.command()
@common_inputs
@_json("Print the plan as JSON.")
def plan(as_json: bool, adapter: Path, source: Path, target: Path, **kw: Any) -> None:
    """Show what maps to what, what is skipped and why, and a memory and time estimate; no SVD."""

    summary = plan_summary(adapter, source, target, **kw)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    rows = [
        (
            u["uid"],
            f"L{u['source_layer']} {u['module']} {u['source_shape'][0]}x{u['source_shape'][1]}",
            f"L{u['target_layer']} {u['module']} {u['target_shape'][0]}x{u['target_shape'][1]}",
            u["rank"],
            u["r"],
            f"{u['svd']['source']}/{u['svd']['target']}",
            u["estimated_seconds"],
        )
        for u in summary["units"]
    ]
    w = [max([len(h), *(len(str(r[i])) for r in rows)]) for i, h in enumerate(("unit", "source", "target", "k", "r", "svd (src/tgt)"))]
    click.echo(f"{'unit':<{w[0]}}  {'source':<{w[1]}}  {'target':<{w[2]}}  {'k':>{w[3]}}  {'r':>{w[4]}}  {'svd (src/tgt)':<{w[5]}}  {'est s':>6}")
    for uid, src, tgt, k, r, how, est in rows:  # columns as wide as their widest entry (a blocked SVD names its rows)
        click.echo(f"{uid:<{w[0]}}  {src:<{w[1]}}  {tgt:<{w[2]}}  {k:>{w[3]}}  {r:>{w[4]}}  {how:<{w[5]}}  {est:>6.2f}")
    for s in summary["skipped"]:
        click.echo(f"skip {s['tensor']}: {s['reason']}")
    for msg in summary.get("warnings", []):
        warn(msg)
    e = summary["estimate"]
    click.echo(
        f"{len(summary['units'])} units, {e['base_matrices']} base matrices to factor; "
        f"estimated {e['seconds']:.0f} s on {e['device']} ({e['gflops']:.0f} GFLOP/s measured here), "
        f"host memory ~{e['baseline_host']} for Python and torch + ~{e['peak_working']} working, under a budget of {e['host_budget']} "
        f"for the whole process (smallest workable budget {e['min_host_budget']}, of which {e['min_working']} working)"
    )


@cli.command()
@_path("--source", TOKENIZER_BASE_HELP.format("Source"))
@_path("--adapter", "The PEFT LoRA adapter trained on the source.")
@_path("--target", TOKENIZER_BASE_HELP.format("Target"))
@_path("--transferred", "The transferred adapter folder (transfer's --out).")
@click_options(VerifyOptions, only=("prompts",))
@click.option(
    "--texts", "texts_file", default=None, type=PATH, help='Your own texts too: .jsonl ({"text": ...} a line) or plain text separated by blank lines.'
)
@click_options(VerifyOptions, exclude=("prompts",))
@_report()
@_json("Print the report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the verdict.")
def verify(source: Path, adapter: Path, target: Path, transferred: Path, prompts_file: Path | None, texts_file: Path | None, **kw: Any) -> None:
    """Measure what --transferred carries of --adapter: score probe texts under source, source + adapter, target,
    target + transferred and target + a random control of the same size; print effects, recovery and a verdict."""

    report_path, as_json, quiet = kw.pop("report_path"), kw.pop("as_json"), kw.pop("quiet")
    check_report_path(report_path, [source, adapter, target, transferred])
    log = (lambda msg: click.echo(msg, err=True)) if not (quiet or as_json) else None
    prompts = read_prompts(prompts_file) if prompts_file is not None else None
    report = run_verify(source, adapter, target, transferred, prompts=prompts, texts=texts_file, log=log, **kw)
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    elif quiet:
        for e in report["verify"]["sets"].values():
            click.echo(e["verdict"])
    else:
        for line in verify_lines(report):
            click.echo(line)


def _run_refine_cli(source: Path, adapter: Path, target: Path, out: Path, quiet: bool, as_json: bool, report_path: Path | None, kw: dict[str, Any]) -> None:
    prompts_file, texts_file = kw.pop("prompts_file"), kw.pop("texts_file")
    check_report_path(report_path, [source, adapter, target, out])
    if prompts_file is not None:
        kw["prompts"] = read_prompts(prompts_file)
    log = (lambda msg: click.echo(msg, err=True)) if not (quiet or as_json) else None
    state: dict[str, Any] = {"bar": None}

    def progress(step: int, total: int, rec: dict[str, float]) -> None:
        if quiet or as_json:
            return
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=total, label="refine", file=sys.stderr, show_pos=True, show_eta=True, item_show_func=lambda x: x)
            state["bar"].__enter__()
            state["bar"].update(step - 1)
        state["bar"].current_item = f"loss {rec['loss']:.4f}"
        state["bar"].update(1)

    try:
        report = run_refine(source, adapter, target, out, texts=texts_file, log=log, progress=progress, **kw)
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    elif quiet:  # as verify's --quiet: the verdict only, never a silent success
        click.echo(f"held out: {report['summary']['holdout_verdict']}")
    else:
        s = report["summary"]
        mib = 2**20
        click.echo(
            f"refined {s['modules']} modules: {s['steps']} steps of {s['objective']} from a {s['init']} start, "
            f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
            f"{s['seconds']:.1f} s on {s['device']}, peak {s['peak_host_bytes'] / mib:.0f} MiB host"
            + ("; stopped early, the held-out split no longer improving" if s.get("stopped_early") else "")
        )
        # the step written and whether it carries the behaviour (beats the random control) on the held-out texts
        click.echo(f"held out: {s['holdout_verdict']}")
        click.echo(f"wrote {out}; grade it with `lowmem-crosslora verify` (it samples fresh texts, not the ones refine trained on)")


@cli.command()
@_path("--source", TOKENIZER_BASE_HELP.format("Source"))
@_path("--adapter", ADAPTER_HELP)
@_path("--target", TOKENIZER_BASE_HELP.format("Target"))
@_path("--out", "Output adapter folder (created; must be empty unless --force).")
@refine_options
@click_options(RefineOptions, only=("seed", "rank", "layer_map", "device", "max_memory", "max_gpu_memory", "restart", "force"))
@_report()
@_quiet
@_json("Print the report as JSON on stdout.")
@click_options(TransferOptions, only=("cache_dir", "cache_limit"))  # refine accepts transfer's --cache-limit (and ignores it)
def refine(source: Path, adapter: Path, target: Path, out: Path, quiet: bool, as_json: bool, report_path: Path | None, **kw: Any) -> None:
    """Distil --adapter into a LoRA on --target from texts the source writes with it (no training data):
    the target's change in log-likelihood is trained to match the adapter's. Resumable; --out is a PEFT folder."""
    kw.pop("cache_limit", None)
    _run_refine_cli(source, adapter, target, out, quiet, as_json, report_path, kw)


@cli.command()
@click.argument("path", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe a model folder or an adapter folder: architecture, dims, modules, rank, dtype."""

    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    for k, v in info.items():
        if isinstance(v, (list, dict)):
            v = json.dumps(v, sort_keys=True)
        click.echo(f"{k:<22} {v}")


cli.add_command(demo)
cli.add_command(migrate_command)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = cli.main(args=args, prog_name="lowmem-crosslora", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # one line, as every other refusal
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except Interrupted as e:
        # The resume command is the same command without what would throw the finished work away.
        kept = [a for a in args if a not in ("--restart", "--no-resume")]
        cmd = " ".join(shlex.quote(a) for a in ["lowmem-crosslora", *kept])
        click.echo(f"{e}; to resume, run: {cmd}", err=True)
        sys.exit(e.exit_code)
    except CrossLoraError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception:  # noqa: BLE001 - anything unexpected: exit 1 with the traceback for a bug report
        traceback.print_exc()
        click.echo("error: unexpected failure (a bug); please report it with the traceback above", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
