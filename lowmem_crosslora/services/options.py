"""The options of every command: dataclasses whose fields are the only source of defaults and help text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowmem_crosslora import dtypes
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.linalg.bases import SvdSettings
from lowmem_crosslora.services.distill import OBJECTIVES


@dataclass
class TransferOptions:
    rank: int = 320
    layer_map: str = "index"
    device: str = "auto"
    dtype: str | None = None  # output dtype; default: the source adapter's
    seed: int = 0
    oversample: int = 10
    niter: int = 2
    exact_ratio: float = 0.5
    compute_dtype: str = "float32"
    max_memory: int | None = None
    max_gpu_memory: int | None = None
    resume: bool = True
    restart: bool = False
    force: bool = False
    prefetch: bool = True
    cache_dir: str | None = None  # the basis cache's folder; None: the platform's user cache folder
    use_cache: bool = True
    cache_limit: int | None = None  # bytes; None: cache.DEFAULT_LIMIT
    target_format: str = "peft"  # "vllm": one r and lora_alpha for every module (see vllm.py)
    allow_pickle: bool = False  # read an adapter_model.bin with torch.load(weights_only=True)
    out_format: str = "peft"  # peft, gguf (a llama.cpp LoRA GGUF) or both; written at the end, so not in result_key

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
        return SvdSettings(self.rank, self.oversample, self.niter, self.exact_ratio, dtypes.COMPUTE[self.compute_dtype])


INITS = ("transfer", "fresh")


# What refine ships (chosen by bench/bench_refine.py; the losers stay in the benchmark).
DEFAULT_OBJECTIVE = "lm"


DEFAULT_INIT = "fresh"


@dataclass
class RefineOptions:
    """Everything that changes the refined adapter (the fingerprint) plus how the run is carried out."""

    objective: str = DEFAULT_OBJECTIVE
    init: str = DEFAULT_INIT
    steps: int = 24
    lr: float = 1e-3
    batch: int = 8
    samples: int = 96
    contrast_samples: int = 48
    max_new_tokens: int = 48
    max_len: int = 128
    seed: int = 0
    kl_weight: float = 1.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    rank: int = 320  # SVD rank of the transfer that places the modules (and initialises, for init "transfer")
    layer_map: str = "index"
    prompts: list[str] | None = None
    device: str = "auto"
    max_memory: int | None = None
    max_gpu_memory: int | None = None
    restart: bool = False
    force: bool = False
    cache_dir: str | None = None

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
            "seed",
            "kl_weight",
            "lora_rank",
            "lora_alpha",
            "rank",
            "layer_map",
            "prompts",
        )
        return {k: getattr(self, k) for k in keep}

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0 or not math.isfinite(self.lr):
            raise InputError("--steps and --batch must be at least 1 and --lr a positive number")
        if self.samples < 1 or self.contrast_samples < 0 or self.max_new_tokens < 1 or self.max_len < 8:
            raise InputError("--samples must be at least 1, --contrast-samples not negative, --max-new-tokens at least 1")
        if (self.lora_rank is not None or self.lora_alpha is not None) and self.init == "transfer":
            raise InputError("--lora-rank and --lora-alpha change the adapter's shape, so it cannot start from the transfer")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError("--lora-rank must be at least 1")


@dataclass
class VerifyOptions:
    """How verify samples and scores its probe texts (the texts themselves are an argument of their own)."""

    prompts: list[str] | None = None
    samples: int = 32
    neutral_samples: int = 8
    max_new_tokens: int = 64
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_memory: int | None = None
