"""Models under the memory budget: load one at a time, encode probe texts, score them token by token, free."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lowmem_crosslora.dtypes import NAME_TAG
from lowmem_crosslora.errors import BudgetError, InputError
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.compute import bf16_speed, release_scratch, upcast_bytes, upcast_model
from lowmem_crosslora.services.memory import Budget, size_at_least
from lowmem_crosslora.services.probes import Probe, prefix_ids
from lowmem_crosslora.sizes import format_size
from lowmem_crosslora.sysmem import host_anon_bytes, release_free_memory

# The log-softmax over the vocabulary is the scoring's working memory: keep a batch's logits below this.
LOGITS_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class InferenceShape:
    """What sampling and scoring with a model hold at once: the rows sampled together (one batch, one
    KV cache) and the logits a scoring batch keeps (length_batches)."""

    rows: int
    logits_bytes: int


# The shape every run takes where it fits (the texts and scores of every measurement so far).
FULL_SHAPE = InferenceShape(48, LOGITS_BYTES)
# Smaller shapes, tried in turn (bfloat16 weights) where the full one does not fit the budget: fewer
# rows sampled together and smaller scoring batches, so slower, and the sampled texts differ by the
# float rounding of the batch's products (probes.sample_probes); scores are the same to rounding.
LEAN_SHAPES = (
    InferenceShape(24, 128 * 1024**2),
    InferenceShape(12, 64 * 1024**2),
    InferenceShape(6, 32 * 1024**2),
    InferenceShape(2, 16 * 1024**2),
)
SHAPES = (FULL_SHAPE, *LEAN_SHAPES)  # in the order the loader tries them


Log = Callable[[str], None]


@dataclass
class Encoded:
    ids: list[int]  # prefix + prompt + text tokens
    first: int  # index of the first scored token (its log-prob is read at first - 1)
    nbytes: int  # UTF-8 bytes covered by the scored tokens
    start: int = 0  # character (of prompt + text) where the first scored token starts
    ends: tuple[int, ...] = ()  # character where each scored token ends (token boundaries, for segments)


def encode(tokenizer: Any, probe: Probe) -> Encoded:
    """Tokenize prompt + text in one piece (as the model would read it) and find the tokens of the text:
    those that end after the prompt. Their characters (from the first scored token's start) are the bytes."""
    full = probe.prompt + probe.text
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    pre = prefix_ids(tokenizer)
    cut = len(probe.prompt)
    first_tok = next((i for i, (_s, e) in enumerate(offsets) if e > cut), len(ids))
    if not pre and first_tok == 0:
        first_tok = 1  # no start token: the first token has no context and is not scored
    if first_tok >= len(ids):
        return Encoded(pre + ids, len(pre) + len(ids), 0, len(full), ())
    start = offsets[first_tok][0]
    nbytes = len(full[start:].encode("utf-8"))
    ends = tuple(int(e) for _s, e in offsets[first_tok:])
    return Encoded(pre + ids, len(pre) + first_tok, nbytes, int(start), ends)


def _prompt_tokens(tokenizer: Any, prompts: list[str]) -> int:
    """Tokens of the longest prompt, without the tokenizer's prefix."""
    return max((len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=0)


def longest_prompt(tokenizer: Any, prompts: list[str]) -> int:
    """Tokens of the longest prompt a sampler starts from, with the tokenizer's usual prefix."""
    return len(prefix_ids(tokenizer)) + _prompt_tokens(tokenizer, prompts)


def longest_sequence(tokenizer: Any, prompts: list[str], new_tokens: int, texts: list[Probe] = ()) -> int:  # type: ignore[assignment]
    """The longest sequence a model will see: a prompt and its sampled continuation, or a given text."""
    longest = _prompt_tokens(tokenizer, prompts) + new_tokens + 1
    return max([longest, *(len(encode(tokenizer, t).ids) for t in texts)])


def length_batches(
    encoded: list[Encoded], vocab: int, copies: int = 1, most: int = 16, logits_bytes: int = LOGITS_BYTES
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """The texts in batches by length (indices, right-padded ids, attention mask), each batch small
    enough that `copies` float32 log-softmaxes of its logits (about 8 bytes a logit each) stay under
    `logits_bytes` (the model's InferenceShape), at most `most` texts."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    i = 0
    while i < len(order):
        # Texts are sorted by length: the last one a batch could hold bounds its longest.
        longest = len(encoded[order[min(len(order) - 1, i + most - 1)]].ids)
        batch = max(1, min(most, logits_bytes // max(1, 8 * copies * longest * vocab)))
        idx = order[i : i + batch]
        T = max(len(encoded[j].ids) for j in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for row, j in enumerate(idx):
            ids = encoded[j].ids
            x[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        yield idx, x, mask
        i += batch


def token_logprobs(model: Any, encoded: list[Encoded], device: str, vocab: int, logits_bytes: int = LOGITS_BYTES) -> list[list[float]]:
    """Log-probability (nats) of each scored token of each encoded text under `model` as it is."""
    out: list[list[float]] = [[] for _ in encoded]
    model.eval()
    for idx, x, mask in length_batches(encoded, vocab, logits_bytes=logits_bytes):
        with torch.inference_mode():
            # log p(token) = its logit - logsumexp(logits): the log-softmax of every entry is never made.
            z = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            tok = (torch.gather(z, 2, x[:, 1:].to(device).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)).double().cpu()
        del z
        for row, j in enumerate(idx):
            e = encoded[j]
            out[j] = tok[row, e.first - 1 : len(e.ids) - 1].tolist() if e.nbytes else []
    return out


def score(model: Any, encoded: list[Encoded], device: str, vocab: int, logits_bytes: int = LOGITS_BYTES) -> list[float]:
    """Log-likelihood per byte (nats) of each encoded text under `model` as it is (adapters as set)."""
    per_token = token_logprobs(model, encoded, device, vocab, logits_bytes)
    return [math.fsum(lp) / e.nbytes if e.nbytes else math.nan for lp, e in zip(per_token, encoded, strict=True)]


def private_weight_params(ckpt: Checkpoint, dtype: str) -> int:
    """Parameters whose copies are private memory once transformers loads the model as `dtype`.
    transformers 5 leaves tensors stored in that very dtype on the safetensors memory map (file-backed
    pages, reclaimable, outside the budget like the transfer's reads); anything converted, or loaded
    by an older transformers, is private."""
    import transformers

    mapped = int(transformers.__version__.split(".")[0]) >= 5
    return sum(math.prod(t.shape) for t in ckpt.tensors.values() if not (mapped and t.dtype == NAME_TAG[dtype]))


def budgeted_params(ckpt: Checkpoint, dtype: str, device: str = "cpu") -> int:
    """Parameters of the model's weights that count against the budget once loaded as `dtype`: the
    private copies on the CPU, all of them on a GPU."""
    return private_weight_params(ckpt, dtype) if device == "cpu" else sum(math.prod(t.shape) for t in ckpt.tensors.values())


def model_bytes(ckpt: Checkpoint, dtype: str, device: str = "cpu") -> int:
    """Budgeted bytes of the model's weights loaded as `dtype` (float32 or a 2-byte dtype)."""
    return budgeted_params(ckpt, dtype, device) * (4 if dtype == "float32" else 2)


def room_left(budget: Budget, device: str) -> int | None:
    """What the budget has left for a model: the whole-process limit less what the process holds now
    (host memory on the CPU; on a GPU, the CUDA context and torch's reserved blocks)."""
    if device == "cpu":
        return budget.max_host - max(0, host_anon_bytes() - budget.baseline)
    return budget.gpu_room()


# What the process keeps from one model to the next (texts, scores, tokenizers): the figure a refusal
# names includes it, so that a run at that figure does not stop again at its next model.
CARRIED = 8 * 1024**2


def raise_to(budget: Budget, device: str, need: int) -> str:
    """The advice for a model or training shape that needs `need` bytes more than the room left."""
    if device == "cpu":
        return f"raise --max-memory to at least {size_at_least(budget.whole_process(need + CARRIED))}"
    return f"raise --max-gpu-memory to at least {size_at_least(budget.gpu_whole_process(need))}"


def vocab_size(ckpt: Checkpoint) -> int:
    """The model's vocabulary (its config's, or its text model's), 32000 when the config says none."""
    return config_vocab(ckpt.config)


def config_vocab(config: dict[str, Any]) -> int:
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 32000)


def inference_bytes(config: dict[str, Any], tokens: int, shape: InferenceShape = FULL_SHAPE, prompt: int | None = None) -> int:
    """Working memory of sampling and scoring with a model beside its weights, for sequences of up to
    `tokens` tokens (prompts of up to `prompt`; None: `tokens`), in `shape`: the larger of the two
    phases, twice the tensors counted (the allocator's and the libraries' transients). Sampling holds
    the logits of every prompt position once (the first pass), the last position's with their softmax
    at each step, and the KV cache; scoring a batch's logits and their log-softmax. The full shape is
    capped by the figure measured on Qwen2.5-0.5B in float32 (weights 1.98 GB, peak working 2.9 GiB:
    logits and their log-softmax up to LOGITS_BYTES together, the layers' activations and the loader's
    slack), which a large vocabulary reaches, and counts its prompts as whole sequences (the figure
    every run so far planned with)."""
    cfg = config.get("text_config", config)
    V, h = config_vocab(config), int(cfg.get("hidden_size", 4096))
    inter, layers = int(cfg.get("intermediate_size", 4 * h)), int(cfg.get("num_hidden_layers", 32))
    heads = int(cfg.get("num_attention_heads", 32))
    kv = int(cfg.get("num_key_value_heads", heads)) * int(cfg.get("head_dim") or h // max(1, heads))
    act = 4 * (4 * h + 3 * inter)  # one layer's transients per token, float32
    rows = shape.rows
    first = tokens if shape == FULL_SHAPE or prompt is None else min(tokens, prompt)
    sample = 4 * rows * first * V + 32 * rows * V + 4 * rows * tokens * (2 * layers * kv + act // 4)
    batch = max(1, min(16, shape.logits_bytes // max(1, 8 * tokens * V)))
    scoring = 12 * batch * tokens * V + batch * tokens * act
    work = 2 * max(sample, scoring) + 16 * 1024**2
    return min(2 * LOGITS_BYTES + 64 * 1024**2, work) if shape == FULL_SHAPE else work


class Loader:
    """Loads one model at a time inside the budget: float32 where it fits, bfloat16 where only that
    does. With --dtype auto, bfloat16 weights compute in float32 where bfloat16 matmuls are slow (the
    upcast path of compute.py); `used` then says so under "<role>_compute"."""

    def __init__(self, budget: Budget, device: str, dtype: str, log: Log) -> None:
        from transformers.utils import logging as transformers_logging

        # Our own lines say what is loading; transformers' per-load bars would break --quiet and the log.
        transformers_logging.disable_progress_bar()
        self.budget, self.device, self.dtype, self.log = budget, device, dtype, log
        self.used: dict[str, str] = {}  # role -> the dtype its model was loaded in (and "<role>_compute")
        self.tokens = 1024  # the longest sequence (prompt + continuation, or scored text) a model will see
        self.prompt: int | None = None  # the longest prompt it samples from (None: as long as `tokens`)
        self.floor = 0  # working memory a later phase needs at the least (refine's training): refusals name it too
        self.shape = FULL_SHAPE  # the loaded model's sampling and scoring shape (pick_dtype's choice)

    def pick_dtype(self, ckpt: Checkpoint) -> str:
        """The dtype to score `ckpt` in: the one asked for, else float32 where it fits, else bfloat16;
        and (in `shape`) the full sampling and scoring shape where it fits, else the largest lean one
        that does (bfloat16 weights)."""
        self.shape = FULL_SHAPE
        room = room_left(self.budget, self.device)
        if room is None:
            room = float("inf")  # no GPU budget
        if self.dtype != "auto":
            self.shape = self._fitting_shape(ckpt, self.dtype, room) or FULL_SHAPE
            return self.dtype
        if self._need(ckpt, "float32", FULL_SHAPE) <= room:
            return "float32"
        # bfloat16 weights; where its matmuls are slow they compute in float32, one block widened at a time.
        fits = self._fitting_shape(ckpt, "bfloat16", room)
        if fits is not None:
            self.shape = fits
            return "bfloat16"
        need = min(self._need(ckpt, "bfloat16", sh) for sh in SHAPES)
        raise BudgetError(
            f"{ckpt.role} model {ckpt.path} needs about {format_size(need)} of working memory to score texts in bfloat16, "
            f"over the budget ({format_size(max(0, int(room)))} left); {raise_to(self.budget, self.device, max(need, self.floor))}"
        )

    def _need(self, ckpt: Checkpoint, dtype: str, shape: InferenceShape) -> int:
        """Weights (the budgeted part, with 15% for the loader) and working memory of `ckpt` as `dtype` in `shape`."""
        work = inference_bytes(ckpt.config, self.tokens, shape, self.prompt)
        if dtype != "float32" and self.dtype == "auto" and not bf16_speed(self.device).fast:
            work += upcast_bytes(ckpt.config)
        return int(1.15 * model_bytes(ckpt, dtype, self.device)) + work

    def _fitting_shape(self, ckpt: Checkpoint, dtype: str, room: float) -> InferenceShape | None:
        """The full shape where it fits `room`, else the largest lean one that does (None: none)."""
        return next((sh for sh in SHAPES if self._need(ckpt, dtype, sh) <= room), None)

    def tokenizer(self, ckpt: Checkpoint) -> Any:
        """The model folder's own tokenizer; it must be a fast one (character offsets)."""
        from transformers import AutoTokenizer

        where = f"{ckpt.role} {ckpt.path}"
        if not any((ckpt.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise InputError(f"{where}: no tokenizer in the model folder (tokenizer.json); verify and refine score text with each model's own tokenizer")
        try:
            tok = AutoTokenizer.from_pretrained(str(ckpt.path))
        except (OSError, ValueError, TypeError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{where}: cannot load its tokenizer: {first}") from None
        if not getattr(tok, "is_fast", False):
            raise InputError(f"{where}: verify and refine need a fast tokenizer (tokenizer.json) for character offsets")
        return tok

    def load(self, ckpt: Checkpoint) -> Any:
        """The model of `ckpt` (transformers), on the device, in eval mode; its dtype is kept in `used`."""
        from transformers import AutoModelForCausalLM

        dtype = self.pick_dtype(ckpt)
        self.used[ckpt.role] = dtype
        speed = bf16_speed(self.device) if self.dtype == "auto" and dtype == "bfloat16" else None
        upcast = speed is not None and not speed.fast
        note = f", computing in float32: {speed.reason}" if speed is not None and upcast else ""
        if self.shape != FULL_SHAPE:
            lean = f"{self.shape.rows} rows sampled at a time, scoring logits up to {format_size(self.shape.logits_bytes)}"
            self.used[f"{ckpt.role}_inference"] = lean
            note += f"; {lean}: the budget is short of the full {FULL_SHAPE.rows} rows, so slower"
        self.log(f"loading {ckpt.role} {ckpt.path} ({dtype}, {self.device}{note})")
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=getattr(torch, dtype))
        if upcast:
            upcast_model(model)
            self.used[f"{ckpt.role}_compute"] = "float32"
        model.to(self.device)
        model.eval()
        return model


def free() -> None:
    """Give the memory of dropped models back: collect, drop the upcast path's scratch blocks, empty
    torch's CUDA cache, return free pages."""
    release_scratch()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release_free_memory()
