"""refine's held-out split: its texts (own seed, never trained on), the evaluations that pick the step
written, early stopping, and the plain "does not carry the behaviour" when no step beats the random
control. The tiny models of tests/helpers.py; where a test needs a step that beats the control (the
tiny target barely moves), the held-out scorer is replaced by a fake one with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli
from helpers import FAST_REFINE, PROMPTS, fast_refine, refine_pair
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowmem_crosslora.commands import refine as refine_mod  # noqa: E402
from lowmem_crosslora.commands.verify import run_verify  # noqa: E402
from lowmem_crosslora.errors import InputError, Interrupted  # noqa: E402
from lowmem_crosslora.io.runstate import state_dir_for  # noqa: E402
from lowmem_crosslora.services.holdout import Holdout  # noqa: E402
from lowmem_crosslora.services.probes import PROBES_NAME, stable_seed  # noqa: E402

FAST = FAST_REFINE


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return refine_pair(tmp_path_factory.mktemp("holdout"))


refine = fast_refine


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def test_holdout_texts_have_their_own_seed_and_are_not_trained_on(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = refine(models, out, holdout=8)
    probes = json.loads((out / PROBES_NAME).read_text())
    held = probes["holdout"]
    hs = stable_seed(0, "holdout")
    assert held["seed"] == hs != probes["seed"]
    assert 0 < len(held["texts"]) <= 8
    for t in held["texts"]:
        i = PROMPTS.index(t["prompt"])
        assert t["origin"] == "adapter" and t["seed"] in {stable_seed("probe", hs, "adapter", i, t["prompt"], j) for j in range(4)}
        assert math.isfinite(t["source_effect"])
    train = probes["texts"]
    assert not {(t["prompt"], t["text"]) for t in held["texts"]} & {(t["prompt"], t["text"]) for t in train}
    assert not {t["seed"] for t in held["texts"]} & {t["seed"] for t in train}

    h = report["refine"]["holdout"]
    assert (h["size"], h["seed"], h["eval_every"], h["patience"]) == (8, hs, 4, 2)
    assert [e["step"] for e in h["evaluations"]] == [0, 2]  # the initialiser, then the last step
    for e in h["evaluations"]:
        assert {"recovery", "recovery_se", "control_recovery", "control_recovery_se", "above_control_se", "z", "beats_control"} <= set(e)
    assert h["carries_behaviour"] == (h["best_step"] is not None) == report["summary"]["carries_behaviour"]
    assert report["summary"]["written_step"] == h["written_step"] and h["stopped_early"] is False and h["steps_run"] == 2
    assert report["summary"]["holdout_verdict"] == h["verdict"]

    # verify grades on a third seed: neither refine's training seed nor its held-out seed, and refuses the latter.
    common = {"samples": 4, "neutral_samples": 0, "max_new_tokens": 12, "device": "cpu", "prompts": PROMPTS}
    r = run_verify(models["source"], models["adapter"], models["target"], out, **common)
    assert r["options"]["seed"] == 1 and r["options"]["refined_on"]["holdout_seed"] == hs
    assert not {(t["prompt"], t["text"]) for t in r["texts"]} & {(t["prompt"], t["text"]) for t in held["texts"] + train}
    with pytest.raises(InputError, match="held-out texts sampled with seed"):
        run_verify(models["source"], models["adapter"], models["target"], out, seed=hs, **common)


def _fake_scores(n: int, value: float) -> list[float]:
    return [value + 0.01 * (-1) ** i for i in range(n)]


def test_best_step_keeps_the_state_of_the_best_evaluation() -> None:
    """A fake scorer: the source effect is 1 on every text, the control moves nothing."""
    hold = Holdout(texts=[], source=[1.0] * 6, seed=7, patience=2, base=[0.0] * 6, deferred=False)
    ctl = [0.0] * 6
    for step, f in [(0, 0.0), (4, 0.5), (8, 0.9), (12, 0.7)]:
        hold.record(step, _fake_scores(6, f), ctl, lambda step=step: {"w": torch.tensor([float(step)])})
    assert hold.best_step == 8 and hold.best_state == {"w": torch.tensor([8.0])} and hold.carries_behaviour
    assert [e["beats_control"] for e in hold.history] == [False, True, True, True]
    assert hold.history[2]["recovery"] == pytest.approx(0.9) and hold.stale == 1 and not hold.stopped
    # A round trip through the checkpoint's form keeps every bit of it.
    again = Holdout(texts=[], source=[1.0] * 6, seed=7, patience=2)
    again.restore(hold.to_checkpoint())
    assert again.to_checkpoint() == hold.to_checkpoint()


def test_early_stopping_after_patience_evaluations_without_a_better_step() -> None:
    hold = Holdout(texts=[], source=[1.0] * 6, seed=7, patience=3, base=[0.0] * 6, deferred=False)
    calls = []
    for k, (step, f) in enumerate([(0, 0.0), (4, 0.8), (8, 0.7), (12, 0.8), (16, 0.6)]):
        hold.record(step, _fake_scores(6, f), [0.0] * 6, lambda: calls.append(1) or {})
        assert hold.stopped == (k == 4), k  # 8, 12 (a tie is no better) and 16: three without a better step
    assert hold.best_step == 4 and len(calls) == 1
    # The controls of the steps that could not be the best are not needed: left unscored, the same
    # evaluations choose the same step and stop at the same one.
    lean = Holdout(texts=[], source=[1.0] * 6, seed=7, patience=3, base=[0.0] * 6, deferred=False)
    for step, f in [(0, 0.0), (4, 0.8), (8, 0.7), (12, 0.8), (16, 0.6)]:
        scores = _fake_scores(6, f)
        lean.record(step, scores, [0.0] * 6 if lean.needs_control(scores) else None, lambda: {})
    assert [e["z"] is None for e in lean.history] == [False, False, True, True, True]
    assert (lean.best_step, lean.stopped) == (hold.best_step, hold.stopped)
    assert [e["recovery"] for e in lean.history] == [e["recovery"] for e in hold.history]
    with pytest.raises(AssertionError, match="score its control"):
        lean.record(20, _fake_scores(6, 0.9), None, lambda: {})
    # No step beats the control: the held-out texts cannot judge the run yet, so it never stops early.
    none = Holdout(texts=[], source=[1.0] * 6, seed=7, patience=2, base=[0.0] * 6, deferred=False)
    for step in (0, 4, 8, 12, 16):
        none.record(step, [0.0] * 6, [0.0] * 6, lambda: {})
        assert not none.stopped
    assert none.best_step is None and not none.carries_behaviour
    assert "does NOT carry the behaviour" in none.report(16, 4, 8, 24)["verdict"]


def _drive(hold: Holdout, evals: list[tuple[int, float, float]], last: int, skip: int = 0) -> dict[str, Any]:
    """Run the held-out rule as refine does over evaluations (step, LoRA's recovery, control's
    recovery): the LoRA scored, the control where needs_control asks, the candidate's where `due`
    asks. The LoRA's "state" is its step; `skip`: evaluations already recorded (a resumed run).
    Returns the choice and how many controls were scored."""

    def ctl(g: float) -> list[float]:  # noise unlike the LoRA's, so the difference has a standard error
        return [g + 0.01 * (i % 3 - 1) for i in range(6)]

    controls, seen = 0, []
    for step, f, g in evals[skip:]:
        if hold.stopped:
            break
        seen.append(step)
        lora, control = _fake_scores(6, f), None
        if step == 0:  # a fresh LoRA: it and its control are the base, scored for free
            lora = control = [0.0] * 6
        elif hold.needs_control(lora):
            control, controls = ctl(g), controls + 1
        hold.record(step, lora, control, lambda step=step: {"w": torch.tensor([float(step)])})
        due = hold.due(step == last)
        if due is not None:
            assert hold.best_state == {"w": torch.tensor([float(due)])}  # the candidate's own state
            controls += 1
            hold.resolve(ctl(dict((s, g) for s, _f, g in evals)[due]))
    state = None if hold.best_state is None else int(hold.best_state["w"].item())
    return {"best": hold.best_step, "seen": seen, "controls": controls, "state": state, "stopped": hold.stopped}


def _rule(deferred: bool, patience: int) -> Holdout:
    return Holdout(texts=[], source=[1.0] * 6, seed=7, patience=patience, base=[0.0] * 6, deferred=deferred)


def test_deferred_control_is_scored_once_for_the_step_chosen() -> None:
    rising = [(0, 0.0, 0.0)] + [(4 * k, 0.1 * k, 0.0) for k in range(1, 7)]
    eager, lazy = _drive(_rule(False, 2), rising, 24), _drive(_rule(True, 2), rising, 24)
    assert eager == {**lazy, "controls": 6} and lazy["best"] == lazy["state"] == 24 and lazy["controls"] == 1
    # A peak, then patience: the candidate's control is scored when patience runs out, with its state.
    peak = [(0, 0.0, 0.0), (4, 0.5, 0.0), (8, 0.8, 0.0), (12, 0.6, 0.0), (16, 0.7, 0.0), (20, 0.9, 0.0)]
    hold = _rule(True, 2)
    got = _drive(hold, peak, 24)
    assert got == {"best": 8, "seen": [0, 4, 8, 12, 16], "controls": 1, "state": 8, "stopped": True}
    assert [e["z"] is None for e in hold.history] == [True, True, False, True, True]  # step 0: a nil LoRA has no z
    assert hold.history[2]["beats_control"] and "step 8 keeps 80%" in hold.verdict(8)
    # The candidate does not beat its control: the steps before it are done with, and each later
    # step's control is scored as it comes (here step 16's beats it and is chosen at the end).
    fails = [(0, 0.0, 0.0), (4, 0.5, 0.0), (8, 0.8, 0.8), (12, 0.6, 0.6), (16, 0.7, 0.0), (20, 0.65, 0.0), (24, 0.6, 0.0)]
    hold = _rule(True, 1)
    got = _drive(hold, fails, 24)
    assert not hold.deferred and got == {"best": 16, "seen": [0, 4, 8, 12, 16, 20], "controls": 2, "state": 16, "stopped": True}
    # Nothing beats: all steps run, the last is written, and the verdict names the one control scored.
    none = [(0, 0.0, 0.0)] + [(4 * k, 0.1 * k, 0.1 * k) for k in range(1, 7)]
    hold = _rule(True, 2)
    assert _drive(hold, none, 24) == {"best": None, "seen": [0, 4, 8, 12, 16, 20, 24], "controls": 1, "state": None, "stopped": False}
    assert "does NOT carry the behaviour" in hold.verdict(24) and "closest: step 24" in hold.verdict(24)
    assert "the step with the highest held-out recovery, and each step after it, did not beat" in hold.verdict(24)


def test_deferred_state_survives_the_checkpoint() -> None:
    peak = [(0, 0.0, 0.0), (4, 0.5, 0.0), (8, 0.8, 0.0), (12, 0.6, 0.0), (16, 0.7, 0.0)]
    whole = _drive(_rule(True, 2), peak, 24)
    part = _rule(True, 2)
    _drive(part, peak[:3], 24)
    assert part.deferred and part.candidate == 2 and part.candidate_lora is not None
    again = _rule(True, 2)
    again.restore(part.to_checkpoint())
    assert again.to_checkpoint() == part.to_checkpoint()
    assert {**_drive(again, peak, 24, skip=3), "seen": None} == {**whole, "seen": None, "controls": 1}
    # a checkpoint written before the deferral existed resumes with each control scored as it comes
    old = {k: v for k, v in part.to_checkpoint().items() if k not in ("deferred", "candidate", "candidate_lora")}
    again = _rule(True, 2)
    again.restore(old)
    assert not again.deferred


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(10, 150), st.booleans()), min_size=1, max_size=8),
    st.integers(1, 3),
)
def test_deferred_control_chooses_as_the_eager_rule(steps: list[tuple[int, bool]], patience: int) -> None:
    """Whatever the recoveries: where every step beats its control, the deferred rule chooses the same
    step, stops at the same one and keeps the same state as scoring each control as it comes, with one
    control scored. Where some do not, the step it writes (if any) beats its own control."""
    last = 4 * len(steps)
    beating = [(0, 0.0, 0.0)] + [(4 * (k + 1), r / 100, 0.0) for k, (r, _) in enumerate(steps)]
    eager, lazy = _drive(_rule(False, patience), beating, last), _drive(_rule(True, patience), beating, last)
    assert {**lazy, "controls": None} == {**eager, "controls": None} and lazy["controls"] == 1 <= eager["controls"]
    mixed = [(0, 0.0, 0.0)] + [(4 * (k + 1), r / 100, 0.0 if ok else r / 100) for k, (r, ok) in enumerate(steps)]
    hold = _rule(True, patience)
    got = _drive(hold, mixed, last)
    if got["best"] is not None:
        b = hold.history[hold.best]
        assert b["beats_control"] and b["step"] == got["state"] == got["best"]
    else:
        assert got["seen"][-1] == last and not got["stopped"]  # never stops early without a best


def fake_scorer(monkeypatch: pytest.MonkeyPatch, factors: dict[int, float], control: float = 0.1) -> None:
    """Held-out scores with known answers: the source effect 1 + i/10 on text i, the LoRA recovering
    factors[step] of it (0.1 where not given), the control a tenth of it with alternating sign (or,
    `control` >= 1, that many times it: no step beats it), the base 0. The step is the last one trained (0 before training)."""
    cur = {"step": 0, "control": False}
    real_step, real_held = refine_mod._step, refine_mod.target_held

    def step(run: Any, model: Any, optim: Any, training: Any, k: int) -> Any:
        cur["step"] = k + 1
        return real_step(run, model, optim, training, k)

    def held(tok: Any, probes: Any, effects: Any, max_len: int) -> Any:
        texts, eff = real_held(tok, probes, effects, max_len)
        cur["step"] = 0  # a new run (made before its first step)
        return texts, [1.0 + i / 10 for i in range(len(eff))]

    class Control(refine_mod.ControlInPlace):
        def __enter__(self) -> Any:
            cur["control"] = True
            return super().__enter__()

        def __exit__(self, *exc: Any) -> None:
            cur["control"] = False
            super().__exit__(*exc)

    def score(model: Any, texts: list[Any], device: str, batch: int) -> list[float]:
        src = [1.0 + i / 10 for i in range(len(texts))]
        if any(getattr(m, "disable_adapters", False) for m in model.modules() if hasattr(m, "lora_A")):
            return [0.0] * len(texts)
        if cur["control"]:
            return [control * s * (-1) ** i if control < 1 else control * s + 0.03 * (i % 3) for i, s in enumerate(src)]
        f = factors.get(cur["step"], 0.1)
        return [f * s + 0.02 * (-1) ** i for i, s in enumerate(src)]

    monkeypatch.setattr(refine_mod, "_step", step)
    monkeypatch.setattr(refine_mod, "target_held", held)
    monkeypatch.setattr(refine_mod, "ControlInPlace", Control)
    monkeypatch.setattr(refine_mod, "loglik_per_byte", score)


def stop_at(k: int) -> Any:
    def progress(step: int, total: int, rec: dict[str, float]) -> None:
        if step == k:
            raise KeyboardInterrupt

    return progress


def test_the_best_step_is_written_and_the_run_stops_early(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_scorer(monkeypatch, {0: 0.0, 4: 0.8, 8: 0.5, 12: 0.6})
    kw = {"steps": 24, "patience": 2}
    logs: list[str] = []
    report = refine(models, tmp_path / "ref", log=logs.append, **kw)
    h = report["refine"]["holdout"]
    assert [e["step"] for e in h["evaluations"]] == [0, 4, 8, 12]
    assert h["best_step"] == h["written_step"] == 4 and h["carries_behaviour"] is True
    assert h["stopped_early"] is True and h["steps_run"] == 12 and len(report["refine"]["losses"]) == 12
    assert h["evaluations"][1]["recovery"] == pytest.approx(0.8, abs=0.01) and h["evaluations"][1]["z"] > 2
    # steps 8 and 12 recover less than step 4: their controls are never scored; step 4's is scored
    # once, when patience runs out at step 12, with step 4's LoRA put in place
    assert [e["control_recovery"] is None for e in h["evaluations"]] == [False, False, True, True]
    assert "held out, step 4: recovery 80% (control scored when chosen) best so far" in logs
    assert "held out, step 8: recovery 50% (control scored when chosen)" in logs
    assert logs.index("held out, step 12: recovery 60% (control scored when chosen)") + 1 == logs.index(
        f"held out, step 4 against its control: control {100 * h['evaluations'][1]['control_recovery']:.0f}%, z {h['evaluations'][1]['z']:+.1f}"
    )
    assert "stopping at step 12 of 24: no better held-out step in 2 evaluations (best: step 4)" in logs
    assert "step 4 keeps 80%" in report["summary"]["holdout_verdict"]
    # The adapter written is step 4's: what a run of 4 steps (same batches) ends with.
    refine(models, tmp_path / "four", steps=4, patience=2)
    assert adapter_bytes(tmp_path / "ref") == adapter_bytes(tmp_path / "four")

    # Killed after the best step and resumed: the same evaluations, the same step, the same bytes.
    with pytest.raises(Interrupted):
        refine(models, tmp_path / "out", progress=stop_at(6), **kw)
    assert state_dir_for(tmp_path / "out", "refine").is_dir()
    again = refine(models, tmp_path / "out", **kw)
    assert again["refine"]["holdout"]["evaluations"] == h["evaluations"]
    assert adapter_bytes(tmp_path / "out") == adapter_bytes(tmp_path / "ref")


def test_a_candidate_below_its_control_leaves_the_training_as_it_was(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Patience runs out at step 8 with step 4 the candidate: step 4's LoRA is put in place for its
    control, which it does not beat, and training goes on from step 8's LoRA, bit for bit: the
    adapter written (the last step, nothing beating its control) is the one of a run whose only
    control is scored on the last step, with no state swapped."""
    logs: list[str] = []
    fake_scorer(monkeypatch, {0: 0.0, 4: 0.8, 8: 0.5, 12: 0.6}, control=2.0)
    swapped = refine(models, tmp_path / "swapped", steps=12, patience=1, log=logs.append)
    h = swapped["refine"]["holdout"]
    assert "held out, step 4 against its control: control 202%, z -" in "\n".join(logs)
    assert "not above it; from here each step's control is scored as it comes" in "\n".join(logs)
    assert [e["control_recovery"] is None for e in h["evaluations"]] == [False, False, True, False]
    assert h["best_step"] is None and h["written_step"] == 12 and h["steps_run"] == 12 and not h["stopped_early"]
    assert "did not beat" in h["verdict"]
    fake_scorer(monkeypatch, {0: 0.0, 4: 0.5, 8: 0.55, 12: 0.6}, control=2.0)
    plain = refine(models, tmp_path / "plain", steps=12, patience=1)
    assert [e["control_recovery"] is None for e in plain["refine"]["holdout"]["evaluations"]] == [False, True, True, False]
    assert adapter_bytes(tmp_path / "swapped") == adapter_bytes(tmp_path / "plain")


def test_no_step_beats_the_control_says_so(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A source adapter that does nothing (B = 0: peft's own initialisation) has no effect to carry:
    refine still writes an adapter (exit 0), and the report and the summary line say it does not carry."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    null = tmp_path / "null-lora"
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(models["source"]), cfg).save_pretrained(null)
    out = tmp_path / "out"
    args = ["refine", "--source", str(models["source"]), "--adapter", str(null), "--target", str(models["target"]), "--out", str(out)]
    args += ["--steps", "2", "--batch", "2", "--samples", "4", "--contrast-samples", "2", "--holdout", "6", "--max-new-tokens", "12"]
    args += ["--prompts", str(models["prompts"]), "--device", "cpu"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "does NOT carry the behaviour" in stdout and "is written anyway" in stdout, stdout
    report = json.loads((out / "crosslora_report.json").read_text())
    assert report["summary"]["carries_behaviour"] is False and report["refine"]["holdout"]["carries_behaviour"] is False
    assert report["refine"]["holdout"]["best_step"] is None and report["summary"]["written_step"] == 2
    assert "does NOT carry the behaviour" in report["refine"]["holdout"]["verdict"]
    assert (out / "adapter_model.safetensors").exists()


def test_a_fresh_lora_scores_as_the_base_exactly(models: dict[str, Path]) -> None:
    """Step 0 of a fresh LoRA (B = 0) is not scored: it and its control add exactly nothing, so the
    target base's scores stand for both. Checked here against scoring it, bit for bit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lowmem_crosslora.services.distill import TrainText, loglik_per_byte
    from lowmem_crosslora.services.effects import ControlInPlace, lora_is_nil

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models["target"]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.eval()
    g = torch.Generator().manual_seed(0)
    texts = [TrainText(torch.randint(5, 100, (n,), generator=g).tolist(), 2, [], [], "holdout", 3 * n) for n in (7, 11, 5)]
    with model.disable_adapter():
        base = loglik_per_byte(model, texts, "cpu", 2)
    assert lora_is_nil(model)
    assert loglik_per_byte(model, texts, "cpu", 2) == base
    with ControlInPlace(model, 7):
        assert loglik_per_byte(model, texts, "cpu", 2) == base
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)
    assert not lora_is_nil(model)
    assert loglik_per_byte(model, texts, "cpu", 2) != base
