"""refine's training shape and memory model (texts per pass, length, gradient checkpointing, the
weights' dtype), and its per-step checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora.dtypes import name_bytes
from lowmem_crosslora.errors import BudgetError
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.compute import bf16_speed, upcast_bytes
from lowmem_crosslora.services.distill import LOGIT_CHUNK_BYTES, uses_contrast
from lowmem_crosslora.services.memory import Budget
from lowmem_crosslora.services.scoring import budgeted_params, raise_to
from lowmem_crosslora.sizes import format_size


def enable_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing on a transformers model, non-reentrant: through
    `activation_checkpointing_enable` where transformers has it (5.x, whose old name warns that it goes
    in v6), else the old `gradient_checkpointing_enable` (4.x)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the trainable (LoRA) parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    model: Any,
    opt: Any,
    step: int,
    losses: list[dict[str, float]],
    fp: str,
    shape: TrainShape,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> None:
    """The training state after `step` (LoRA, optimiser, losses, shape, and `extra`: e.g. the held-out
    evaluations and the best step's LoRA), written atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(
            {
                "fingerprint": fp,
                "step": step,
                "lora": lora_state(model),
                "optimizer": opt.state_dict(),
                "losses": losses,
                "shape": shape.to_json(),
                "seconds": seconds,
                **(extra or {}),
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, fp: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it is readable and was made by the run with fingerprint `fp`, else None."""
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint is redone from the start, never trusted
        return None
    return ck if isinstance(ck, dict) and ck.get("fingerprint") == fp else None


@dataclass(frozen=True)
class TrainShape:
    """What the budget allows: texts per forward pass, longest text (target tokens), checkpointing."""

    micro_batch: int
    max_len: int
    checkpointing: bool
    weights_dtype: str
    bytes: int  # modelled working memory
    # What the frozen weights compute in ("" = their own dtype) and why (compute.py); float32 compute
    # on bfloat16 weights is the upcast path (one float32 block of a weight alive at a time).
    compute_dtype: str = ""
    compute: str = ""

    @property
    def upcast(self) -> bool:
        return self.compute_dtype == "float32" and self.weights_dtype != "float32"

    def to_json(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "max_len": self.max_len,
            "gradient_checkpointing": self.checkpointing,
            "weights_dtype": self.weights_dtype,
            "modelled_bytes": self.bytes,
            "compute_dtype": self.compute_dtype or self.weights_dtype,
            "compute": self.compute,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainShape:
        return cls(
            obj["micro_batch"],
            obj["max_len"],
            obj["gradient_checkpointing"],
            obj["weights_dtype"],
            obj["modelled_bytes"],
            obj.get("compute_dtype", obj["weights_dtype"]),
            obj.get("compute", ""),
        )


def train_bytes(cfg: dict[str, Any], params: int, lora_params: int, weights_bytes: int, micro: int, seq: int, ckpt: bool, passes: int) -> int:
    """Modelled working memory of one training step on the target.

    Weights (frozen, `weights_bytes` per parameter); LoRA parameters with their gradients and two
    AdamW moments (float32); activations kept for the backward pass, per token and layer: with
    gradient checkpointing only the layer's input (H) plus one layer being recomputed, without it
    every layer's intermediates (about 16 H + 4 I values, attention scores heads x T); the
    vocabulary projection in chunks of LOGIT_CHUNK_BYTES (kept alive twice: forward and recompute);
    `passes` forward passes alive at once (the KL term holds a second, ungraded one's final state)."""
    H = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * H)
    L = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    act = 4  # activations of a float32 LoRA path and the upcast norms dominate; bfloat16 halves some
    per_layer_token = (16 * H + 4 * inter) * act + heads * seq * act * 2
    tokens = micro * seq
    if ckpt:
        acts = tokens * (L * H * act + per_layer_token)
    else:
        acts = tokens * L * per_layer_token
    acts *= passes
    vocab = int(cfg.get("vocab_size") or 32000)
    logits = min(LOGIT_CHUNK_BYTES, 4 * tokens * vocab * 2)  # a chunk of logits and its gradient, float32
    return int(params * weights_bytes + 16 * lora_params + acts + 2 * logits + 64 * 1024**2)


def choose_shape(
    cfg: dict[str, Any],
    params: int,
    lora_params: int,
    room: int,
    batch: int,
    longest: int,
    passes: int,
    dtypes: tuple[str, ...],
    extra: int = 0,
    least: int = 1,
) -> TrainShape | None:
    """The fastest shape that fits `room`, for the first of `dtypes` whose weights fit: the longest
    texts (shorter ones, down to 32 tokens, only where nothing fits), then the most texts per pass,
    without gradient checkpointing where that takes at most twice the passes a step that checkpointing
    would (`step_cost`), else with it. `extra`: bytes the compute path holds besides (the upcast
    path's float32 blocks, compute.upcast_bytes). `least`: the fewest texts a pass can hold (2 for the
    objectives that pair an adapter text with a contrast text in each pass). None when nothing fits."""
    for dt in dtypes:
        for seq in _lengths(longest):
            plain = _most_texts(cfg, params, lora_params, dt, room, batch, seq, False, passes, extra, least)
            recompute = _most_texts(cfg, params, lora_params, dt, room, batch, seq, True, passes, extra, least)
            if plain is not None and (recompute is None or step_cost(plain, batch) <= step_cost(recompute, batch)):
                return plain
            if recompute is not None:
                return recompute
    return None


# Gradient checkpointing recomputes each layer's forward pass in the backward one: about 1.5x the
# compute of a step without it. Every pass also has a fixed cost (the upcast path widens every weight
# in it; kernel and Python overheads), so more, smaller passes cost too. Measured on Qwen2.5-0.5B, the
# upcast path, 8 texts of 60 tokens a step, one core (docs/BENCHMARKS.md, "Training shape"): a step
# without checkpointing in 2 passes is faster than one with it in 1 pass, in 4 passes slower.
PLAIN_PASSES = 2


def step_cost(shape: TrainShape, batch: int) -> int:
    """A step's relative cost in `shape` (batch texts): its passes, a checkpointed one counted PLAIN_PASSES times."""
    return -(-batch // shape.micro_batch) * (PLAIN_PASSES if shape.checkpointing else 1)


def _most_texts(
    cfg: dict[str, Any], params: int, lora_params: int, dtype: str, room: int, batch: int, seq: int, ckpt: bool, passes: int, extra: int, least: int
) -> TrainShape | None:
    """The shape with the most texts per pass (`least` up to `batch`) of `seq` tokens that fits `room`."""
    wb = name_bytes(dtype)
    for micro in range(batch, least - 1, -1):
        need = train_bytes(cfg, params, lora_params, wb, micro, seq, ckpt, passes) + extra
        if need <= room:
            return TrainShape(micro, seq, ckpt, dtype, need)
    return None


def smallest_room(cfg: dict[str, Any], params: int, lora_params: int, longest: int, passes: int, dtype: str, extra: int = 0, least: int = 1) -> int:
    size = name_bytes(dtype)
    return train_bytes(cfg, params, lora_params, size, least, min(longest, 32), True, passes) + extra


def pick_shape(tgt: Checkpoint, lora_params: int, room: int, per_step: int, longest: int, passes: int, device: str, least: int = 1) -> TrainShape | None:
    """The training shape for `tgt` in `room`, with the frozen weights' dtype and what they compute in
    (the LoRA itself trains in float32), from a timing at start-up (services/compute.py). Where
    bfloat16 matmuls are fast (AMX, AVX512-BF16, CUDA): bfloat16 weights, half the memory and about
    3x float32's speed (Qwen2.5-0.5B, 8 x 64 tokens: 3.0 s vs 9.8 s a step). Where they are slow
    (AVX2 only: 0.3 GFLOP/s against 35): float32 weights where they fit without a smaller step, else
    bfloat16 weights computing in float32 (each weight widened one block at a time: the upcast
    path, more bytes). None when nothing fits."""
    speed = bf16_speed(device)
    params = budgeted_params(tgt, "bfloat16", device)
    if speed.fast:
        shape = choose_shape(tgt.config, params, lora_params, room, per_step, longest, passes, ("bfloat16",), least=least)
        return shape and replace(shape, compute_dtype="bfloat16", compute=speed.reason)
    extra = upcast_bytes(tgt.config)
    p32 = budgeted_params(tgt, "float32", device)
    s32 = choose_shape(tgt.config, p32, lora_params, room, per_step, longest, passes, ("float32",), least=least)
    s16 = choose_shape(tgt.config, params, lora_params, room, per_step, longest, passes, ("bfloat16",), extra=extra, least=least)

    def rank(s: TrainShape) -> tuple[int, int]:
        return (s.max_len, -step_cost(s, per_step))

    if s32 is not None and (s16 is None or rank(s32) >= rank(s16)):
        return replace(s32, compute_dtype="float32", compute=f"{speed.reason}: float32 weights")
    return s16 and replace(s16, compute_dtype="float32", compute=f"{speed.reason}: bfloat16 weights, float32 compute")


def scoring_batch(tgt: Checkpoint, lora_params: int, shape: TrainShape, passes: int, device: str, most: int) -> int:
    """Texts a pass without gradients (held-out scores, the base's log-probabilities) takes in the
    memory modelled for `shape`: a checkpointed step of n texts holds more than a no-gradient pass of
    n (every layer's input against one layer's), so the most n (up to `most`) whose checkpointed step
    fits `shape.bytes`, and never fewer than the shape's own texts per pass. Fewer passes: each pass
    widens every weight once on the upcast path."""
    params = budgeted_params(tgt, shape.weights_dtype, device)
    extra = upcast_bytes(tgt.config) if shape.upcast else 0
    wb = name_bytes(shape.weights_dtype)
    for n in range(max(most, shape.micro_batch), shape.micro_batch, -1):
        if train_bytes(tgt.config, params, lora_params, wb, n, shape.max_len, True, passes) + extra <= shape.bytes:
            return n
    return shape.micro_batch


def least_training(tgt: Checkpoint, lora_params: int, objective: str, device: str, longest: int = 32) -> int:
    """The least working memory training a LoRA on `tgt` needs: bfloat16 weights (computing in float32
    where bfloat16 matmuls are slow), one text of up to min(longest, 32) tokens a pass, checkpointing."""
    passes = 2 if objective == "lm+kl" else 1
    extra = 0 if bf16_speed(device).fast else upcast_bytes(tgt.config)
    least = least_texts(objective)
    return smallest_room(tgt.config, budgeted_params(tgt, "bfloat16", device), lora_params, longest, passes, "bfloat16", extra, least)


def least_texts(objective: str) -> int:
    """The fewest texts a training pass holds: an adapter text and a contrast text together for the
    objectives that train on contrast texts, one otherwise."""
    return 2 if uses_contrast(objective) else 1


def training_refused(target: Path, budget: Budget, device: str, need: int) -> BudgetError:
    return BudgetError(
        f"training a LoRA on the target {target} needs at least {format_size(need)} of working memory "
        f"(bfloat16 weights, one text at a time, gradient checkpointing); {raise_to(budget, device, need)}"
    )


def _lengths(longest: int) -> list[int]:
    out = [longest]
    n = longest
    while n > 32:
        n = max(32, n * 3 // 4)
        out.append(n)
    return out
