"""The options of every command: dataclasses whose fields are the only source of defaults and help
text, and `click_options`, which turns their fields into click options (mergekit's MergeOptions
pattern). A field's metadata says how it is spelled on the command line (see Flag)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import click

from lowmem_crosslora import dtypes
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.linalg.bases import SvdSettings
from lowmem_crosslora.services.cache import DEFAULT_LIMIT
from lowmem_crosslora.services.distill import OBJECTIVES
from lowmem_crosslora.services.probe_select import SELECTIONS
from lowmem_crosslora.sizes import parse_size

F = TypeVar("F", bound=Callable[..., Any])

CLI = "cli"  # the metadata key of a field's command-line spelling


@dataclass(frozen=True)
class Flag:
    """How a field is spelled on the command line."""

    help: str
    name: str | None = None  # the option; default --field-name ("--for", "--resume/--no-resume", "--no-cache")
    dest: str | None = None  # the keyword the option fills; default the field's name (--prompts fills prompts_file)
    type: Any = None  # a click type; default int or float from the annotation, else text
    choices: tuple[str, ...] | None = None
    negate: bool = False  # a flag that sets the field to False (--no-cache)
    parse: Callable[[str], Any] | None = None  # e.g. parse_size; its InputError is a bad parameter


def option(default: Any = MISSING, help: str = "", **cli: Any) -> Any:
    """A dataclass field that is a command-line option; no default: a required option."""
    return field(default=default, metadata={CLI: Flag(help, **cli)})


def same(cls: type, name: str, **changes: Any) -> Any:
    """Field `name` of `cls` again for another command: the same default and spelling, but for `changes`
    (default= and any Flag attribute, e.g. help=)."""
    f = {f.name: f for f in fields(cls)}[name]
    default = changes.pop("default", f.default)
    meta = {CLI: dataclasses.replace(f.metadata[CLI], **changes)} if CLI in f.metadata else {}
    return field(default=default, metadata=meta)


_TYPES = {"int": int, "float": float}  # the click types read from annotations ("int | None": int); others: text


def _annotated(f: dataclasses.Field[Any]) -> type | None:
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return _TYPES.get(ann.split(" | ")[0])


def _parsed(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except InputError as e:
            raise click.BadParameter(str(e)) from None

    return callback


def _negated(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    return not value


def _click_option(f: dataclasses.Field[Any]) -> Callable[[F], F]:
    c: Flag = f.metadata[CLI]
    name = c.name or "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"help": c.help}
    if f.default is MISSING:
        kw["required"] = True
    elif "/" in name:
        kw.update(default=f.default, show_default=True)
    elif isinstance(f.default, bool):
        kw["is_flag"] = True
    else:
        kw["default"] = f.default
        if f.default is not None:
            kw["show_default"] = True
    if c.negate:
        kw["callback"] = _negated
    elif c.parse is not None:
        kw["callback"] = _parsed(c.parse)
    elif c.choices is not None:
        kw["type"] = click.Choice(list(c.choices))
    elif c.type is not None:
        kw["type"] = c.type
    elif not kw.get("is_flag") and _annotated(f) is not None:
        kw["type"] = _annotated(f)
    return click.option(name, c.dest or f.name, **kw)


def click_options(cls: type, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """A decorator that adds the fields of `cls` that have a Flag as click options: those named in
    `only`, in that order, or else every one but `exclude`, in the fields' order."""
    spelled = {f.name: f for f in fields(cls) if CLI in f.metadata}
    unknown = {*(only or ()), *exclude} - set(spelled)
    if unknown:
        raise ValueError(f"{cls.__name__} has no command-line options {sorted(unknown)}")
    names = list(only) if only is not None else [n for n in spelled if n not in set(exclude)]
    decorators = [_click_option(spelled[n]) for n in names]

    def decorate(func: F) -> F:
        for d in reversed(decorators):
            func = d(func)
        return func

    return decorate


DEVICES = "auto, cpu, cuda, cuda:N or mps"
LIMIT_TEXT = f"{DEFAULT_LIMIT // 1000**3}GB"  # the basis cache's size limit as typed on the command line


def _host_budget(example: str) -> str:
    return f"Private memory of the whole process, Python and torch included{example} [default: what they hold plus half of what is available]."


@dataclass
class TransferOptions:
    rank: int = option(320, "SVD rank r (clipped to each module's dimensions).")
    layer_map: str = option("index", "index: same layer number; depth: target layer j takes source layer round(j(Ls-1)/(Lt-1)).", choices=("index", "depth"))
    device: str = option("auto", f"{DEVICES}.")
    dtype: str | None = option(None, "Output dtype [default: the source adapter's].", choices=("float32", "float16", "bfloat16"))
    seed: int = option(0, "Seed mixed into every randomized SVD's key.")
    oversample: int = option(10, "Extra columns of the randomized range finder (q = r + oversample).")
    niter: int = option(2, "Power iterations of the randomized SVD.")
    exact_ratio: float = 0.5
    compute_dtype: str = option("float32", "Precision of the SVD and projection.", choices=tuple(dtypes.COMPUTE))
    stack: int = option(
        1,
        "Factor up to N base matrices of one shape together in one batched randomized SVD (for GPUs, where a small "
        "factorisation is bound by kernel launches); the bases equal one-at-a-time's up to rounding.",
    )
    max_memory: int | None = option(None, _host_budget(", e.g. 2GB, 1.5GiB"), parse=parse_size)
    max_gpu_memory: int | None = option(
        None, "GPU memory of the whole process, CUDA context included [default: what it holds plus 80% of free GPU memory].", parse=parse_size
    )
    resume: bool = option(True, "Continue an interrupted transfer into the same --out.", name="--resume/--no-resume")
    restart: bool = option(False, "Discard an interrupted transfer's state and start over.")
    force: bool = option(False, "Replace a non-empty output folder.")
    prefetch: bool = True
    # the basis cache's folder; None: the platform's user cache folder
    cache_dir: str | None = option(None, "Basis cache folder [default: the platform's user cache folder, e.g. ~/.cache/lowmem-crosslora].", type=click.Path())
    use_cache: bool = option(True, "Neither read nor write the basis cache.", name="--no-cache", negate=True)
    cache_limit: int | None = option(  # bytes; None: cache.DEFAULT_LIMIT
        None, f"Size limit of the basis cache; least recently used entries are evicted past it [default: {LIMIT_TEXT}].", parse=parse_size
    )
    # "vllm": one r and lora_alpha for every module (see vllm.py)
    target_format: str = option(
        "peft", "vllm: one r and lora_alpha for every module (exactly rescaled), as vLLM requires.", name="--for", choices=("peft", "vllm")
    )
    # read an adapter_model.bin with torch.load(weights_only=True)
    allow_pickle: bool = option(False, "Read a pickled adapter_model.bin with torch.load(weights_only=True).")
    # peft, gguf (a llama.cpp LoRA GGUF) or both; written at the end, so not in result_key
    out_format: str = option(
        "peft",
        "peft: a PEFT adapter folder; gguf: a llama.cpp LoRA GGUF (adapter_model.gguf) and the report; both: all of them.",
        choices=("peft", "gguf", "both"),
    )

    def result_key(self) -> dict[str, Any]:
        """The options that change the output's bytes (the budget and device only move rounding)."""
        return {
            "rank": self.rank,
            "layer_map": self.layer_map,
            "dtype": self.dtype,
            "seed": self.seed,
            "oversample": self.oversample,
            "niter": self.niter,
            "exact_ratio": self.exact_ratio,
            "compute_dtype": self.compute_dtype,
            "target_format": self.target_format,
        }

    def svd_settings(self) -> SvdSettings:
        if self.compute_dtype not in dtypes.COMPUTE:
            raise InputError(f"unknown compute dtype {self.compute_dtype!r}; choose float32 or float64")
        if self.oversample < 0 or self.niter < 0:
            raise InputError("--oversample and --niter must not be negative")
        if self.stack < 1:
            raise InputError("--stack must be at least 1")
        return SvdSettings(self.rank, self.oversample, self.niter, self.exact_ratio, dtypes.COMPUTE[self.compute_dtype])


INITS = ("transfer", "fresh")
HEAD_SUBSETS = ("full", "texts")  # the lm term's softmax: the whole vocabulary, or the training texts' ids


# What refine ships (chosen by bench/bench_refine.py; the losers stay in the benchmark).
DEFAULT_OBJECTIVE = "lm"


DEFAULT_INIT = "fresh"


@dataclass
class RefineOptions:
    """Everything that changes the refined adapter (the fingerprint) plus how the run is carried out."""

    objective: str = DEFAULT_OBJECTIVE
    init: str = DEFAULT_INIT
    steps: int = option(24, "Optimizer steps of the distillation.")
    lr: float = option(1e-3, "AdamW learning rate.")
    batch: int = option(8, "Probe texts per step (split into passes that fit the budget).")
    samples: int = option(96, "Probe texts sampled from source + adapter.")
    contrast_samples: int = option(48, "Contrast texts sampled from the source base, for the objectives that train on them (delta, lm+kl, pair).")
    max_new_tokens: int = option(48, "Length of each sampled text, in source tokens.")
    max_len: int = 128
    holdout: int = option(16, "Held-out texts sampled from source + adapter with their own seed (never trained on) to pick the step and stop on; 0: none.")
    # An evaluation scores the held-out texts once without gradients (the LoRA; twice where the control of
    # the step about to be chosen is scored, services/holdout.py): at most about a step's cost at the
    # defaults (16 texts against 8 forward and backward), so every 4th step keeps it under a quarter.
    eval_every: int = 4
    patience: int = option(2, "Stop once this many held-out evaluations in a row found no better step.")
    seed: int = same(TransferOptions, "seed", help="Seed of the probe texts, the initialisation and the batch order.")
    kl_weight: float = 1.0
    # "lm+soft" (a candidate, as probe_select): the source's likeliest next tokens kept per scored token
    # (adapter on and off, each), and the weight of the soft-label term (services/distill.py)
    soft_top: int = 8
    soft_weight: float = 1.0
    # its teacher: "shift" (the target base shifted by the source adapter's change) or "source" (the
    # source + adapter's own next-token distribution over the shared tokens)
    soft_teacher: str = "shift"
    # The `lm` term's softmax (a candidate, as probe_select): "full", the whole vocabulary, or "texts", only
    # the ids the training texts contain (cheaper where the vocabulary is large; the other ids are never
    # pushed down, so it changes the loss; bench/bench_vocab_head.py times it)
    head_subset: str = "full"
    # Which sampled texts are kept (services/probe_select.py): a candidate measured in bench/bench_refine.py,
    # not a command-line option until it wins there.
    probe_select: str = "plain"
    amplify: float = 0.0  # > 0: half the adapter's texts sampled with its effect magnified (a candidate, as probe_select)
    chat: bool = False  # half the adapter's texts written through the source's chat template (a candidate, as probe_select)
    # > 0: an on-policy round (a candidate, as probe_select): halfway through the steps the target + LoRA
    # writes this many texts, the source scores them (adapter off and on), and every later step adds the
    # "delta" loss on a batch of them, times onpolicy_weight (commands/refine.py, _onpolicy_round)
    onpolicy: int = 0
    onpolicy_weight: float = 1.0
    # > 0: the round keeps only this share of its texts, those the source adapter prefers most (its change in
    # log-likelihood per byte), and trains on them with the LM loss instead of "delta" (best-of-N)
    onpolicy_keep: float = 0.0
    lora_rank: int | None = option(None, "Rank of the trained LoRA [default: the source adapter's].")
    lora_alpha: float | None = option(None, "lora_alpha of the trained LoRA [default: the source adapter's].")
    # SVD rank of the transfer that places the modules (and initialises, for init "transfer")
    rank: int = same(TransferOptions, "rank", help="SVD rank of the transfer that places the modules.")
    layer_map: str = same(TransferOptions, "layer_map", help="How target layers take source layers.")
    # on the command line, --prompts names a file of them (prompts_file; services/probes.py reads it)
    prompts: list[str] | None = option(
        None, "Prompts to sample probe texts from, one a line [default: built-in].", dest="prompts_file", type=click.Path(path_type=Path)
    )
    device: str = same(TransferOptions, "device")
    max_memory: int | None = same(TransferOptions, "max_memory", help=_host_budget(", e.g. 2GB"))
    max_gpu_memory: int | None = same(TransferOptions, "max_gpu_memory")
    restart: bool = same(TransferOptions, "restart", help="Discard an interrupted refine's checkpoint and start over.")
    force: bool = same(TransferOptions, "force")
    cache_dir: str | None = same(TransferOptions, "cache_dir")

    def result_key(self) -> dict[str, Any]:
        keep = (
            "objective",
            "init",
            "steps",
            "lr",
            "batch",
            "samples",
            "contrast_samples",
            "max_new_tokens",
            "max_len",
            "holdout",
            "eval_every",
            "patience",
            "seed",
            "kl_weight",
            "lora_rank",
            "lora_alpha",
            "rank",
            "layer_map",
            "prompts",
        )
        key = {k: getattr(self, k) for k in keep}
        if self.probe_select != "plain":  # the shipped selection leaves earlier fingerprints as they were
            key["probe_select"] = self.probe_select
        if self.amplify:
            key["amplify"] = self.amplify
        if self.chat:
            key["chat"] = True
        if self.objective == "lm+soft":
            key["soft_top"] = self.soft_top
            key["soft_weight"] = self.soft_weight
            if self.soft_teacher != "shift":
                key["soft_teacher"] = self.soft_teacher
        if self.head_subset != "full":
            key["head_subset"] = self.head_subset
        if self.onpolicy:
            key["onpolicy"] = self.onpolicy
            key["onpolicy_weight"] = self.onpolicy_weight
            if self.onpolicy_keep:
                key["onpolicy_keep"] = self.onpolicy_keep
        return key

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.onpolicy < 0 or not math.isfinite(self.onpolicy_weight) or self.onpolicy_weight < 0:
            raise InputError("onpolicy must be a number of texts >= 0 and onpolicy_weight a finite number >= 0")
        if not 0 <= self.onpolicy_keep <= 1:
            raise InputError(f"onpolicy_keep is a share of the round's texts, from 0 to 1 (got {self.onpolicy_keep})")
        if not math.isfinite(self.amplify) or self.amplify < 0:
            raise InputError(f"amplify must be a finite number >= 0 (got {self.amplify})")
        if self.head_subset not in HEAD_SUBSETS:
            raise InputError(f"unknown head_subset {self.head_subset!r}; choose one of {', '.join(HEAD_SUBSETS)}")
        if self.head_subset != "full" and self.objective != "lm":
            raise InputError(f"head_subset {self.head_subset!r} applies to the lm objective only (got {self.objective!r})")
        if self.probe_select not in SELECTIONS:
            raise InputError(f"unknown probe selection {self.probe_select!r}; choose one of {', '.join(SELECTIONS)}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0 or not math.isfinite(self.lr):
            raise InputError("--steps and --batch must be at least 1 and --lr a positive number")
        if self.soft_teacher not in ("shift", "source"):
            raise InputError(f"unknown soft teacher {self.soft_teacher!r}; choose shift or source")
        if self.objective == "pair" and self.contrast_samples < 1:
            raise InputError("the pair objective compares adapter texts with contrast texts: --contrast-samples must be at least 1")
        if self.samples < 1 or self.contrast_samples < 0 or self.max_new_tokens < 1 or self.max_len < 8:
            raise InputError("--samples must be at least 1, --contrast-samples not negative, --max-new-tokens at least 1")
        if (self.lora_rank is not None or self.lora_alpha is not None) and self.init == "transfer":
            raise InputError("--lora-rank and --lora-alpha change the adapter's shape, so it cannot start from the transfer")
        if self.holdout < 0 or self.holdout == 1 or self.eval_every < 1 or self.patience < 1:
            raise InputError("--holdout must be 0 (none) or at least 2 (for standard errors), --patience at least 1")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError("--lora-rank must be at least 1")


@dataclass
class VerifyOptions:
    """How verify samples and scores its probe texts (the texts themselves are an argument of their own)."""

    prompts: list[str] | None = same(RefineOptions, "prompts")
    samples: int = same(RefineOptions, "samples", default=32)
    neutral_samples: int = option(8, "Neutral texts sampled from the source base (collateral).")
    max_new_tokens: int = same(RefineOptions, "max_new_tokens", default=64)
    seed: int | None = option(
        None, "Seed of the sampling and of the random control adapter [default: 0; for a refined adapter, the seed after the one it trained on]."
    )
    device: str = same(TransferOptions, "device")
    dtype: str = option("auto", "auto: float32 where the budget allows.", choices=("auto", "float32", "bfloat16", "float16"))
    max_memory: int | None = same(TransferOptions, "max_memory", help=_host_budget(", e.g. 4GB"))


@dataclass
class BasesOptions:
    """What `bases` needs: the SVD settings of the transfers that will use the bases, and the cache."""

    rank: int = same(TransferOptions, "rank", default=MISSING, help="SVD rank R; each weight is stored at min(R, m, n).")
    device: str = same(TransferOptions, "device", help=f"{DEVICES} (the device of the transfers that will use them).")
    max_memory: int | None = same(TransferOptions, "max_memory", help=_host_budget(""))
    max_gpu_memory: int | None = same(TransferOptions, "max_gpu_memory")
    seed: int = same(TransferOptions, "seed")
    oversample: int = same(TransferOptions, "oversample", help="Extra columns of the randomized range finder.")
    niter: int = same(TransferOptions, "niter")
    exact_ratio: float = same(TransferOptions, "exact_ratio")
    compute_dtype: str = same(TransferOptions, "compute_dtype", help="Precision of the SVD.")
    stack: int = same(TransferOptions, "stack")
    cache_dir: str | Path | None = same(TransferOptions, "cache_dir")
    cache_limit: int | None = same(TransferOptions, "cache_limit")

    def svd_settings(self) -> SvdSettings:
        shared = {f.name for f in fields(TransferOptions)}
        return TransferOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in shared}).svd_settings()


@dataclass
class CacheOptions:
    """The `cache` subcommands' options."""

    cache_dir: str | None = same(TransferOptions, "cache_dir", help="Basis cache folder [default: the platform's].")
    max_size: str = option(LIMIT_TEXT, "Evict least recently used entries until the cache is at most this size.", parse=parse_size)  # bytes once parsed


@dataclass
class MigrateOptions:
    """What `migrate` applies to every job of a manifest, and where the jobs run."""

    rank: int = same(TransferOptions, "rank")
    layer_map: str = same(TransferOptions, "layer_map")
    device: str = same(TransferOptions, "device")
    seed: int = same(TransferOptions, "seed")
    max_memory: int | None = same(TransferOptions, "max_memory", help="Private memory of each job's process, e.g. 2GB [default: each job's own default].")
    cache_dir: str | None = same(
        TransferOptions,
        "cache_dir",
        help="Basis cache folder the jobs share (with Ray: one every node sees; a node that does not see it computes what it misses).",
    )
    ray: str | None = option(
        None,
        "Run the jobs as Ray tasks: 'local' (a cluster on this machine of --workers CPUs), 'auto' (the running cluster) or its address. "
        "Without it the jobs run here, one (source, target) pair at a time.",
    )
    workers: int = option(2, "With --ray local: CPUs of the cluster started here (one job per CPU).")

    def check(self) -> None:
        if self.rank < 1:
            raise InputError(f"--rank must be at least 1 (got {self.rank})")
        if self.workers < 1:
            raise InputError(f"--workers must be at least 1 (got {self.workers})")

    def job_kwargs(self) -> dict[str, Any]:
        """The options every transfer and refine of the migration gets (the others keep their defaults)."""
        return {
            "rank": self.rank,
            "layer_map": self.layer_map,
            "device": self.device,
            "seed": self.seed,
            "max_memory": self.max_memory,
            "cache_dir": self.cache_dir,
        }
