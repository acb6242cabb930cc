"""refine's held-out evaluation: which step to keep, and when to stop.

A LoRA distilled on probe texts scores well on those very texts whatever it learned, so a step is
judged on other texts: a split sampled from source + adapter with its own seed (distill.holdout_seed)
and never trained on. Each evaluation scores them on the target as verify does (log-likelihood per
byte) with the LoRA as it is and with a random control of the same per-module norms (effects.py),
against the target base (scored once), and compares the changes with the source effect on the same
texts:

    recovery = mean(target effect) / mean(source effect), the control's beside it, and
    recovery above the control = mean(target - control) / mean(source), with a paired standard error.

A step *beats the control* when that difference is more than Z_CUTOFF standard errors above zero.
The best step is the one with the highest recovery among those that beat the control; ties keep the
earlier step. The run stops once `patience` evaluations in a row after the best one found no
better one. While no step has beaten the control, training runs all its steps: the held-out texts
cannot judge it yet, and stopping then cut short the one development-pair run measured with an
earlier rule (Qwen2.5-Coder-0.5B -> SmolLM2-135M bullets: neutral held-out texts the source adapter
barely moves, no step above the control, stopped at step 12, held-out recovery -176%; docs/BENCHMARKS.md).
Where no step beat the control the last step trained is written, marked as not carrying the behaviour.

The control is scored once, for the step about to be chosen (`deferred`): each evaluation scores
the LoRA alone; the step with the highest recovery so far is the *candidate* (its LoRA state kept,
as the best step's is), and patience counts from it. When patience runs out, or the last step is
evaluated, the candidate's control is scored (the same control: seeded, of that step's norms). If
it beats the control it is the best step, chosen exactly as above, with one control pass where
every rising evaluation used to take one (in each of 29 development-pair runs with a kept history
the step with the highest held-out recovery beat its control, by 5.1 standard errors or more;
docs/BENCHMARKS.md). If it does not, the
steps before it are no longer candidates (their states are gone), and from there every step whose
control could decide is scored as it comes, by the rule above. The tracker's whole state goes
into the training checkpoint, so a resumed run chooses the same step as an uninterrupted one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowmem_crosslora.services.distill import TrainText
from lowmem_crosslora.services.effects import Z_CUTOFF, mean_se, ratio_se
from lowmem_crosslora.services.probes import Probe
from lowmem_crosslora.services.scoring import encode


def target_held(tok: Any, probes: list[Probe], source_effect: list[float], max_len: int) -> tuple[list[TrainText], list[float]]:
    """The held-out texts in the target's tokens (cut to `max_len` tokens; the bytes are those of the
    tokens kept), with their source effects; texts with nothing to score on the target are left out."""
    texts, effects = [], []
    for p, eff in zip(probes, source_effect, strict=True):
        e = encode(tok, p)
        ids, ends = e.ids[:max_len], list(e.ends)[: max(0, max_len - e.first)]
        if not e.nbytes or not ends:
            continue
        nbytes = len((p.prompt + p.text)[e.start : ends[-1]].encode("utf-8"))
        if nbytes:
            texts.append(TrainText(ids, e.first, [], [], "holdout", nbytes))
            effects.append(eff)
    return texts, effects


def _r(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 6)


def assess(step: int, source: list[float], base: list[float], lora: list[float], control: list[float] | None) -> dict[str, Any]:
    """One evaluation from per-text log-likelihoods per byte (target base, + LoRA, + control) and the
    source effects: recovery, the control's, the difference and its z (rounded, as reported). `control`
    None: not scored (a step that could not be the best), its fields None."""
    if control is None:
        rec = assess(step, source, base, lora, lora)
        return {**rec, **dict.fromkeys(("control_recovery", "control_recovery_se", "above_control", "above_control_se", "z", "beats_control"))}
    keep = [i for i in range(len(source)) if not any(math.isnan(x[i]) for x in (source, base, lora, control))]
    d_s = [source[i] for i in keep]
    d_t = [lora[i] - base[i] for i in keep]
    d_c = [control[i] - base[i] for i in keep]
    d_tc = [a - b for a, b in zip(d_t, d_c, strict=True)]
    rec, rec_se = ratio_se(d_t, d_s)
    ctl, ctl_se = ratio_se(d_c, d_s)
    above, above_se = ratio_se(d_tc, d_s)
    z = above / above_se if above_se > 0 and not math.isnan(above_se) and not math.isnan(above) else math.nan
    te, _ = mean_se(d_t)
    return {
        "step": step,
        "texts": len(keep),
        "target_effect": _r(te),
        "recovery": _r(rec),
        "recovery_se": _r(rec_se),
        "control_recovery": _r(ctl),
        "control_recovery_se": _r(ctl_se),
        "above_control": _r(above),
        "above_control_se": _r(above_se),
        "z": _r(z),
        "beats_control": bool(not math.isnan(z) and z > Z_CUTOFF),
    }


@dataclass
class Holdout:
    """The held-out split on the target's side and the evaluations so far: the history, the best
    evaluation and its LoRA state, how many evaluations since it, and whether the run stopped."""

    texts: list[TrainText]
    source: list[float]  # the source effect per text (nats/byte)
    seed: int
    patience: int
    base: list[float] | None = None  # the target base's log-likelihood per byte, scored once
    history: list[dict[str, Any]] = field(default_factory=list)
    best: int | None = None  # index into history of the best evaluation that beat the control
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped: bool = False
    deferred: bool = True  # the control scored once, for the candidate (see above); False: as each step could decide
    candidate: int | None = None  # deferred: index into history of the highest recovery so far, its control unscored
    candidate_lora: list[float] | None = None  # its LoRA scores, for assessing it with its control

    def needs_control(self, lora: list[float]) -> bool:
        """Whether an evaluation with these LoRA scores could be the best, so that its control decides:
        there is no best yet, or its recovery is higher than the best's. Any other step is not the best
        whatever its control scores, so refine does not score the control for it (the same choice of
        step, a pass over the held-out texts fewer). Deferred: never (`due` says when the candidate's is)."""
        if self.deferred:
            return False
        if self.best is None:
            return True
        assert self.base is not None, "score the target base before the first evaluation"
        r = assess(0, self.source, self.base, lora, None)["recovery"]
        return r is not None and r > self.history[self.best]["recovery"]

    def record(self, step: int, lora: list[float], control: list[float] | None, state: Callable[[], dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Add the evaluation of `step` (the target base must be scored; `control` None only where
        needs_control said no); `state` is called for the LoRA's state when this step is the best (or,
        deferred, the candidate) so far. Returns the evaluation. The initialiser's evaluation (step 0)
        can be the best but does not count towards the patience. Deferred, ask `due` next."""
        assert self.base is not None, "score the target base before the first evaluation"
        assert control is not None or not self.needs_control(lora), "this step could be the best: score its control"
        rec = assess(step, self.source, self.base, lora, control)
        self.history.append(rec)
        if self.deferred:
            known_fail = rec["beats_control"] is False  # a nil LoRA's control is the base: scored for free
            top = self.candidate is None or (rec["recovery"] is not None and rec["recovery"] > self.history[self.candidate]["recovery"])
            if not known_fail and rec["recovery"] is not None and top:
                self.candidate, self.candidate_lora, self.best_state, self.stale = len(self.history) - 1, list(lora), state(), 0
                self._settle()
            elif step > 0 and self.candidate is not None:
                self.stale += 1
            return rec
        if rec["beats_control"] and (self.best is None or rec["recovery"] > self.history[self.best]["recovery"]):
            self.best, self.best_state, self.stale = len(self.history) - 1, state(), 0
        elif step > 0 and self.best is not None:  # patience runs from a step that beat the control
            self.stale += 1
            self.stopped = self.stale >= self.patience
        return rec

    def due(self, last: bool) -> int | None:
        """Deferred: the step whose control is to be scored now (with its LoRA state, `best_state`, in
        place), and passed to `resolve`; None: nothing to score. `last`: the last step was evaluated."""
        if not self.deferred or self.candidate is None or (self.stale < self.patience and not last):
            return None
        return int(self.history[self.candidate]["step"])

    def resolve(self, control: list[float]) -> dict[str, Any]:
        """The candidate's control scores (see `due`): it is the best step if it beats the control (and
        the run stops if patience ran out); if not, the rule turns to scoring each control as it comes.
        Returns the candidate's evaluation, now with its control."""
        assert self.base is not None and self.candidate is not None and self.candidate_lora is not None, "no candidate to resolve"
        c = self.candidate
        rec = assess(int(self.history[c]["step"]), self.source, self.base, self.candidate_lora, control)
        self.history[c] = rec
        self._settle()
        return rec

    def _settle(self) -> None:
        """Deferred: a candidate whose control is known is the best step (the run stops if patience ran
        out), or it is not and the steps before it are done with; either way the deferral ends, and any
        later evaluation scores each control as it comes."""
        c = self.candidate
        if c is None or self.history[c]["beats_control"] is None:
            return
        if self.history[c]["beats_control"]:
            self.best = c
            self.stopped = self.stale >= self.patience
        else:
            self.best, self.best_state, self.stale = None, None, 0
        self.deferred, self.candidate, self.candidate_lora = False, None, None

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else int(self.history[self.best]["step"])

    @property
    def carries_behaviour(self) -> bool:
        return self.best is not None

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "history": self.history,
            "best": self.best,
            "best_state": self.best_state,
            "stale": self.stale,
            "stopped": self.stopped,
            "deferred": self.deferred,
            "candidate": self.candidate,
            "candidate_lora": self.candidate_lora,
        }

    def restore(self, obj: dict[str, Any]) -> None:
        self.base = list(obj["base"]) if obj.get("base") is not None else None
        self.history = [dict(r) for r in obj["history"]]
        self.best = obj["best"]
        self.best_state = obj["best_state"]
        self.stale, self.stopped = int(obj["stale"]), bool(obj["stopped"])
        # a checkpoint from before the deferred control goes on as it began: each control as it comes
        self.deferred, self.candidate = bool(obj.get("deferred", False)), obj.get("candidate")
        self.candidate_lora = list(obj["candidate_lora"]) if obj.get("candidate_lora") is not None else None

    def report(self, size: int, eval_every: int, steps_run: int, steps: int) -> dict[str, Any]:
        """The report's `holdout` section (`steps_run`: the last step trained)."""
        written = self.best_step if self.best_step is not None else steps_run
        return {
            "size": size,
            "seed": self.seed,
            "texts": len(self.texts),
            "eval_every": eval_every,
            "patience": self.patience,
            "evaluations": self.history,
            "best_step": self.best_step,
            "written_step": written,
            "stopped_early": self.stopped and steps_run < steps,
            "steps_run": steps_run,
            "carries_behaviour": self.carries_behaviour if self.history else None,
            "verdict": self.verdict(written),
        }

    def verdict(self, written: int) -> str:
        """One line: what the written step does on the held-out texts, against the random control."""
        if not self.history:
            return f"not measured: none of the held-out texts (seed {self.seed}) could be scored on the target"
        where = f"on {len(self.texts)} held-out probe texts (seed {self.seed}, never trained on)"

        def pct(v: float | None, se: float | None = None) -> str:
            return "undefined" if v is None else f"{100 * v:.0f}%" + ("" if se is None else f" (+/- {100 * se:.0f})")

        if self.best is not None:
            b = self.history[self.best]
            return (
                f"{where}: step {b['step']} keeps {pct(b['recovery'], b['recovery_se'])} of the source effect, "
                f"{b['z']:.1f} standard errors above a random adapter of the same size ({pct(b['control_recovery'])}); the adapter is that step"
            )
        # the controls scored: every step's, or (deferred) the failed candidate's and each later step's
        top = max(self.history, key=lambda r: -math.inf if r["z"] is None else r["z"])
        unscored = any(r["z"] is None and r["step"] > 0 for r in self.history)
        which = "the step with the highest held-out recovery, and each step after it, did not beat" if unscored else "no step beat"
        src_m, src_se = mean_se(self.source)
        weak = "" if src_se > 0 and abs(src_m / src_se) >= Z_CUTOFF else " (the source adapter itself changes them by no more than noise)"
        return (
            f"{where}: the adapter does NOT carry the behaviour{weak}: {which} a random adapter of the same size by "
            f"{Z_CUTOFF:.0f} standard errors (closest: step {top['step']}, recovery {pct(top['recovery'])} against the "
            f"control's {pct(top['control_recovery'])}); the last step trained, {written}, is written anyway"
        )
