"""Sampling and scoring under a tight budget (services/scoring.py, InferenceShape): the full shape
wherever it fits (the figure every earlier run planned with, so their texts and scores stay as they
were), else the largest lean shape that fits (bfloat16 weights, fewer rows sampled together, smaller
scoring batches), else a refusal that names the smallest; refine samples and scores in the shape chosen
and says so in its report."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import fast_refine, refine_pair

pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowmem_crosslora.errors import BudgetError  # noqa: E402
from lowmem_crosslora.io.safetensors_model import Checkpoint  # noqa: E402
from lowmem_crosslora.services import compute, probe_set, scoring  # noqa: E402
from lowmem_crosslora.services.memory import Budget  # noqa: E402
from lowmem_crosslora.services.scoring import FULL_SHAPE, LEAN_SHAPES, inference_bytes  # noqa: E402
from lowmem_crosslora.sizes import parse_size  # noqa: E402

# Qwen2.5-0.5B's shape: the large vocabulary that makes the logits the working memory.
QWEN_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
MIB = 1024**2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return refine_pair(tmp_path_factory.mktemp("shape"))


def test_the_full_shape_keeps_the_figure_runs_planned_with() -> None:
    """Restated by hand: 48 rows whose prompts count as whole sequences, scoring batches of up to 256
    MiB of logits, twice the tensors, capped at 576 MiB (a large vocabulary reaches the cap)."""
    V, h, inter, L, kv, T = 151936, 896, 4864, 24, 2 * 64, 59
    act = 4 * (4 * h + 3 * inter)
    sample = 4 * 48 * T * V + 32 * 48 * V + 4 * 48 * T * (2 * L * kv + act // 4)
    batch = max(1, min(16, 256 * MIB // (8 * T * V)))
    score = 12 * batch * T * V + batch * T * act
    assert inference_bytes(QWEN_05B, T) == min(576 * MIB, 2 * max(sample, score) + 16 * MIB) == 576 * MIB
    # the prompt's length does not change the full shape's figure
    assert inference_bytes(QWEN_05B, T, FULL_SHAPE, prompt=12) == inference_bytes(QWEN_05B, T)
    small = {**QWEN_05B, "vocab_size": 1000}  # below the cap: the formula itself
    assert inference_bytes(small, T) < 576 * MIB


def test_lean_shapes_shrink_and_count_prompts_by_their_length() -> None:
    figures = [inference_bytes(QWEN_05B, 59, sh, prompt=12) for sh in LEAN_SHAPES]
    # never more for a smaller shape (equal where scoring one text at a time is the larger part)
    assert figures == sorted(figures, reverse=True) and figures[-1] < figures[0]
    assert all(a.rows > b.rows and a.logits_bytes > b.logits_bytes for a, b in zip(LEAN_SHAPES, LEAN_SHAPES[1:], strict=False))
    assert LEAN_SHAPES[0].rows < FULL_SHAPE.rows and LEAN_SHAPES[0].logits_bytes < FULL_SHAPE.logits_bytes
    # a prompt shorter than the sequence counts less; unknown (None) counts as the whole sequence
    assert inference_bytes(QWEN_05B, 59, LEAN_SHAPES[0], prompt=12) < inference_bytes(QWEN_05B, 59, LEAN_SHAPES[0])
    # the point of the smallest: a 0.5B model with a 152k vocabulary samples and scores in well under
    # the full shape's 576 MiB, beside 1.2 GB of mapped weights and libraries in a 2 GB process
    assert figures[-1] < 256 * MIB < 576 * MIB


def test_the_loader_takes_the_full_shape_then_the_largest_lean_one_then_refuses(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ck = Checkpoint(models["source"], "source")
    monkeypatch.setattr(compute, "FORCE", True)  # bfloat16 fast: no upcast blocks in the figures
    monkeypatch.setattr(scoring, "model_bytes", lambda c, name, dev="cpu": 10**12 if name == "float32" else 1000)
    loader = scoring.Loader(Budget(None, None, "cpu"), "cpu", "auto", lambda m: None)
    loader.tokens, loader.prompt = 40, 8
    shapes = (FULL_SHAPE, *LEAN_SHAPES)
    needs = [loader._need(ck, "bfloat16", sh) for sh in shapes]
    assert needs[0] > needs[-1]
    for room in sorted({*needs, *(n - 1 for n in needs)}, reverse=True):
        monkeypatch.setattr(scoring, "room_left", lambda b, d, room=room: room)
        if all(n > room for n in needs):
            continue  # refused: below
        assert loader.pick_dtype(ck) == "bfloat16"
        chosen = shapes.index(loader.shape)
        # the first shape (full, then the lean ones from the largest) whose figure fits the room
        assert needs[chosen] <= room and all(n > room for n in needs[:chosen])
    monkeypatch.setattr(scoring, "room_left", lambda b, d: min(needs) - 1)
    with pytest.raises(BudgetError) as e:
        loader.pick_dtype(ck)
    msg = str(e.value)
    assert "to score texts in bfloat16" in msg and "raise --max-memory to at least" in msg
    named = msg.rsplit("at least ", 1)[1].replace(" ", "")
    assert parse_size(named) >= min(needs)
    # room for everything: float32 with the full shape, as before
    monkeypatch.setattr(scoring, "model_bytes", lambda c, name, dev="cpu": 1000)
    monkeypatch.setattr(scoring, "room_left", lambda b, d: 10**13)
    assert loader.pick_dtype(ck) == "float32" and loader.shape == FULL_SHAPE


def _force_lean(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Put the full shape over any budget; returns the logits budgets the scoring batches are given."""
    real_need = scoring.Loader._need
    monkeypatch.setattr(scoring.Loader, "_need", lambda self, ck, dt, sh: 10**15 if sh == FULL_SHAPE else real_need(self, ck, dt, sh))
    budgets: list[int] = []
    real_batches = scoring.length_batches
    monkeypatch.setattr(scoring, "length_batches", lambda *a, **k: budgets.append(k.get("logits_bytes")) or real_batches(*a, **k))
    return budgets


def test_refine_samples_and_scores_in_the_lean_shape_it_was_given(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the full shape over the budget, the source samples LEAN_SHAPES[0].rows rows at a time,
    scores within its logits, and the report says so; the run finishes and writes its adapter."""
    budgets = _force_lean(monkeypatch)
    rows: list[int] = []
    real_sample = probe_set.sample_probes
    monkeypatch.setattr(probe_set, "sample_probes", lambda *a, **kw: rows.append(kw["rows"]) or real_sample(*a, **kw))
    report = fast_refine(models, tmp_path / "lean")
    lean = LEAN_SHAPES[0]
    assert rows and set(rows) == {lean.rows}
    assert budgets and set(budgets) == {lean.logits_bytes}
    said = report["summary"]["dtypes"]["source_inference"]
    assert said.startswith(f"{lean.rows} rows sampled at a time")
    assert (tmp_path / "lean" / "adapter_model.safetensors").exists()


def test_verify_in_a_lean_shape_samples_the_same_texts_and_scores_them_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify (float32) with the full shape over the budget: it samples LEAN_SHAPES[0].rows rows at a
    time (12 and 4 texts: one batch in either shape, so the same texts) and scores them in smaller
    batches; every effect equals the full shape's to float rounding, and the report says which shape
    it used."""
    from helpers import write_llama, write_lora

    from lowmem_crosslora import transfer
    from lowmem_crosslora.commands import verify as verify_mod

    model = write_llama(tmp_path / "llama")
    adapter = write_lora(model, tmp_path / "lora", seed=10)
    out = tmp_path / "self-transfer"
    transfer(adapter, model, model, out, rank=64, device="cpu", use_cache=False)
    # float32 both times (the lean shapes otherwise come with bfloat16 weights, which sample other texts)
    kw = {"prompts": ["The weather today", "A story:"], "samples": 12, "neutral_samples": 4, "max_new_tokens": 16, "seed": 1}
    kw |= {"device": "cpu", "dtype": "float32"}
    full = verify_mod.run_verify(model, adapter, model, out, **kw)
    assert "source_inference" not in full["summary"]["dtypes"]

    budgets = _force_lean(monkeypatch)
    rows: list[int] = []
    real_sample = verify_mod.sample_probes
    monkeypatch.setattr(verify_mod, "sample_probes", lambda *a, **k: rows.append(k["rows"]) or real_sample(*a, **k))
    lean = verify_mod.run_verify(model, adapter, model, out, **kw)
    assert rows and set(rows) == {LEAN_SHAPES[0].rows}
    assert budgets and set(budgets) == {LEAN_SHAPES[0].logits_bytes}  # source and target scoring alike
    assert lean["summary"]["dtypes"]["source_inference"].startswith(f"{LEAN_SHAPES[0].rows} rows sampled at a time")
    assert lean["summary"]["dtypes"]["target_inference"].startswith(f"{LEAN_SHAPES[0].rows} rows sampled at a time")
    for name, s in full["verify"]["sets"].items():
        t = lean["verify"]["sets"][name]
        assert t["texts"] == s["texts"]
        for eff in ("source_effect", "target_effect", "control_effect"):
            assert t[eff]["mean"] == pytest.approx(s[eff]["mean"], rel=1e-4, abs=1e-6), (name, eff)
