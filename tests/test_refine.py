"""refine: an adapter distilled onto a model of another family, from texts the source writes with it.

Tiny models with offline tokenizers (tests/helpers.py): the source is test_verify's llama (hidden 64, 2 layers, one token
per character) with a rank-8 LoRA on q and o; the target a qwen2 (hidden 48, 2 layers) whose tokenizer
merges common letter pairs, so the two tokenizations differ and the segments between them are not
trivial. Every run samples a few short probe texts and trains a few steps, so the whole file stays fast
on one CPU thread.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import read_tensors, run_cli, run_module
from helpers import FAST_REFINE, PROMPTS, fast_refine, refine_pair

pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowmem_crosslora import hooks  # noqa: E402
from lowmem_crosslora.commands import refine as refine_mod  # noqa: E402
from lowmem_crosslora.commands.refine import CHECKPOINT_NAME  # noqa: E402
from lowmem_crosslora.commands.verify import run_verify  # noqa: E402
from lowmem_crosslora.errors import InputError, Interrupted  # noqa: E402
from lowmem_crosslora.io.runstate import state_dir_for  # noqa: E402
from lowmem_crosslora.services import train_shape as train_shape_mod  # noqa: E402
from lowmem_crosslora.services.distill import OBJECTIVES, TrainText, uses_contrast  # noqa: E402
from lowmem_crosslora.services.options import INITS  # noqa: E402
from lowmem_crosslora.services.probes import (  # noqa: E402
    PROBES_NAME,  # noqa: E402
    Probe,
    stable_seed,
)
from lowmem_crosslora.services.scoring import encode, token_logprobs  # noqa: E402
from lowmem_crosslora.services.train_shape import choose_shape, smallest_room, train_bytes  # noqa: E402

FAST = FAST_REFINE
OUT_FILES = {"adapter_config.json", "adapter_model.safetensors", "crosslora_report.json", PROBES_NAME}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return refine_pair(tmp_path_factory.mktemp("refine"))


refine = fast_refine


@pytest.fixture(scope="module")
def refined(models: dict[str, Path]) -> dict[str, Any]:
    """The default refine (objective lm, fresh init, seed 0) of the llama adapter onto the qwen2."""
    out = models["root"] / "refined"
    logs: list[str] = []
    report = refine(models, out, log=logs.append)
    return {"out": out, "report": report, "logs": logs}


def cli_args(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["refine", "--source", str(models["source"]), "--adapter", str(models["adapter"]), "--target", str(models["target"]), "--out", str(out)]
    args += ["--steps", "4", "--batch", "2", "--samples", "4", "--contrast-samples", "2", "--max-new-tokens", "12"]
    return [*args, "--prompts", str(models["prompts"]), "--device", "cpu", *extra]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def probe_texts(out: Path) -> list[dict[str, Any]]:
    """The probe texts of a refined folder (refine_probes.json also holds the seconds sampling took)."""
    return json.loads((out / PROBES_NAME).read_text())["texts"]


def losses(out: Path) -> list[dict[str, float]]:
    return json.loads((out / "crosslora_report.json").read_text())["refine"]["losses"]


def stop_at(k: int) -> Any:
    """A progress callback that interrupts the run (as SIGINT would) once step k is checkpointed."""

    def progress(step: int, total: int, rec: dict[str, float]) -> None:
        if step == k:
            raise KeyboardInterrupt

    return progress


def test_refined_output_is_a_peft_adapter_that_changes_the_target(models: dict[str, Path], refined: dict[str, Any]) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = refined["out"], refined["report"]
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert not state_dir_for(out, "refine").exists()
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.0 and cfg["inference_mode"] is True
    assert cfg["base_model_name_or_path"] == str(models["target"])

    # PEFT loads it onto the target, every LoRA tensor from the file and nothing left over.
    saved = read_tensors(out / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["target"]), str(out))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved) and len(saved) == 2 * 2 * 2  # 2 layers x q, o x A, B
    for k, v in saved.items():
        assert torch.equal(loaded[k].float(), v), k
        assert torch.isfinite(v).all()
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # trained away from the zero start
    tok = AutoTokenizer.from_pretrained(models["target"])
    x = torch.tensor([tok("The weather is nice today")["input_ids"]])
    model.eval()
    with torch.no_grad():
        on = model(input_ids=x).logits
        with model.disable_adapter():
            off = model(input_ids=x).logits
    assert (on - off).abs().max() > 1e-4

    assert report == json.loads((out / "crosslora_report.json").read_text())
    assert report["kind"] == "refine" and report["schema"] == "lowmem-crosslora/report/1"
    s = report["summary"]
    assert (s["objective"], s["init"], s["steps"], s["modules"]) == ("lm", "fresh", 2, 4)
    steps = report["refine"]["losses"]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert s["first_loss"] == steps[0]["loss"] and s["final_loss"] == steps[1]["loss"]
    assert "sampling 4 texts from source + adapter (seed 0)" in refined["logs"]  # "lm" samples no contrast texts
    ps = report["refine"]["probe_set"]
    assert ps["seed"] == 0 and ps["file"] == PROBES_NAME and ps["prompts"] == PROMPTS

    probes = json.loads((out / PROBES_NAME).read_text())
    assert probes["seed"] == 0 and probes["prompts"] == PROMPTS and probes["max_new_tokens"] == 12
    texts = probes["texts"]
    assert {t["origin"] for t in texts} == {"adapter"}  # "lm" trains on no contrast texts, so samples none
    assert sum(t["origin"] == "adapter" for t in texts) == ps["texts"]["adapter"] == ps["trained_on"] > 0
    for t in texts:
        # Each text with the seed its own random draws came from: (run seed 0, origin, prompt, sample index).
        i = PROMPTS.index(t["prompt"])
        assert t["text"] and t["seed"] in {stable_seed("probe", 0, t["origin"], i, t["prompt"], j) for j in range(4)}
        assert t["source_token_ends"] and "source_token_delta" not in t  # "lm" never reads the source's changes
    assert len({t["seed"] for t in texts}) == len(texts)
    # Different tokenizations: the qwen2's merged pairs span several of the llama's one-character tokens.
    tgt_tok = AutoTokenizer.from_pretrained(models["target"])
    lens = [len(encode(tgt_tok, Probe(t["prompt"], t["text"], None, t["origin"])).ends) for t in texts]
    assert sum(lens) < sum(len(t["source_token_ends"]) for t in texts)


def test_same_seed_same_bytes_other_seed_other_bytes(models: dict[str, Path], refined: dict[str, Any], tmp_path: Path) -> None:
    refine(models, tmp_path / "again")
    assert adapter_bytes(tmp_path / "again") == adapter_bytes(refined["out"])
    assert probe_texts(tmp_path / "again") == probe_texts(refined["out"])
    refine(models, tmp_path / "seed1", seed=1)
    assert adapter_bytes(tmp_path / "seed1") != adapter_bytes(refined["out"])
    assert [t["text"] for t in probe_texts(tmp_path / "seed1")] != [t["text"] for t in probe_texts(refined["out"])]


def test_lm_does_not_score_its_training_texts_on_the_source_and_writes_the_same_bytes(
    models: dict[str, Path], refined: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "lm" never reads the source adapter's per-token changes, so refine does not score the training
    texts with the adapter on and off (two source passes over each text); the adapter it writes is the
    one a run that scores them writes, and the held-out texts are still scored."""
    from lowmem_crosslora.services import probe_set

    scored: list[int] = []
    real = probe_set._token_changes

    def spy(model: Any, enc: list[Any], *args: Any) -> list[list[float]]:
        scored.append(len(enc))
        return real(model, enc, *args)

    monkeypatch.setattr(probe_set, "_token_changes", spy)
    report = refine(models, tmp_path / "plain")
    assert scored == [] and report["refine"]["holdout"]["texts"] > 0
    assert adapter_bytes(tmp_path / "plain") == adapter_bytes(refined["out"])
    monkeypatch.setattr(refine_mod, "uses_token_changes", lambda objective: True)
    refine(models, tmp_path / "scored")
    assert scored == [4]  # the 4 training texts, once, when an objective would read them
    texts = probe_texts(tmp_path / "scored")
    assert all(len(t["source_token_delta"]) == len(t["source_token_ends"]) for t in texts)
    assert adapter_bytes(tmp_path / "scored") == adapter_bytes(refined["out"])


def test_killed_cli_run_resumes_to_the_same_bytes(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tmp_path / "ref"
    code, _out, err = run_cli(cli_args(models, ref, "--quiet"), capsys)
    assert code == 0, err

    out = tmp_path / "out"
    monkeypatch.setenv("LOWMEM_CROSSLORA_TEST_KILL", "refine_step:2")
    code, _out, err = run_module(cli_args(models, out))
    assert code == -9, err
    monkeypatch.delenv("LOWMEM_CROSSLORA_TEST_KILL")
    state = state_dir_for(out, "refine")
    assert not out.exists() and state.is_dir()
    assert torch.load(state / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    probes = (state / PROBES_NAME).read_bytes()

    code, _out, err = run_module(cli_args(models, out))
    assert code == 0, err
    # It took the probe texts from the interrupted run (no second sampling) and went on from step 2.
    assert re.search(r"probe texts: \d+ kept from the interrupted run", err) and "resuming at step 2 of 4" in err
    assert "sampling" not in err
    assert (out / PROBES_NAME).read_bytes() == probes and probe_texts(out) == probe_texts(ref)
    assert adapter_bytes(out) == adapter_bytes(ref)
    assert losses(out) == losses(ref)
    assert not state.exists()


@pytest.mark.parametrize(("objective", "init"), [("lm", "transfer"), ("delta", "fresh"), ("lm+kl", "fresh")])
def test_interrupted_run_resumes_to_the_same_bytes(models: dict[str, Path], tmp_path: Path, objective: str, init: str) -> None:
    """Every objective and init resumes to what an uninterrupted run writes (the CLI test above covers lm, fresh)."""
    kw = {"objective": objective, "init": init, "steps": 4}
    refine(models, tmp_path / "ref", **kw)
    with pytest.raises(Interrupted):
        refine(models, tmp_path / "out", progress=stop_at(1), **kw)
    assert not (tmp_path / "out").exists() and state_dir_for(tmp_path / "out", "refine").is_dir()
    logs: list[str] = []
    refine(models, tmp_path / "out", log=logs.append, **kw)
    assert "resuming at step 1 of 4" in logs
    assert losses(tmp_path / "out") == losses(tmp_path / "ref")
    assert adapter_bytes(tmp_path / "out") == adapter_bytes(tmp_path / "ref")


def test_other_options_do_not_resume_an_interrupted_refine(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def interrupt(point: str, step: int) -> None:
        if point == "refine_step" and step == 1:
            raise KeyboardInterrupt

    remove = hooks.install(interrupt)
    try:
        code, _out, err = run_cli(cli_args(models, out, "--quiet"), capsys)
    finally:
        remove()
    assert code == 130 and "to resume, run: lowmem-crosslora refine" in err
    state = state_dir_for(out, "refine")
    checkpoint = (state / CHECKPOINT_NAME).read_bytes()

    code, _out, err = run_cli(cli_args(models, out, "--lr", "0.01"), capsys)
    assert code == 2
    line = one_error_line(err)
    assert "other inputs or options" in line and "--restart" in line
    assert (state / CHECKPOINT_NAME).read_bytes() == checkpoint and not out.exists()

    code, _out, err = run_cli(cli_args(models, out, "--lr", "0.01", "--restart"), capsys)
    assert code == 0, err
    assert "resuming" not in err and "sampling" in err
    report = json.loads((out / "crosslora_report.json").read_text())
    assert report["options"]["lr"] == 0.01 and report["summary"]["steps"] == 4
    assert not state.exists()


def test_budget_too_small_exits_3(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _out, err = run_cli(cli_args(models, out, "--max-memory", "1MB"), capsys)
    assert code == 3
    assert "raise --max-memory to at least" in one_error_line(err)
    assert not out.exists()


def test_the_budget_named_in_the_error_is_enough() -> None:
    """refine's BudgetError names smallest_room: exactly the least room choose_shape finds a shape in."""
    cfg = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    for longest, passes, least in [(20, 1, 1), (100, 2, 1), (500, 1, 1), (100, 1, 2)]:
        need = smallest_room(cfg, 10**6, 10**4, longest, passes, "bfloat16", least=least)
        shape = choose_shape(cfg, 10**6, 10**4, need, 8, longest, passes, ("bfloat16",), least=least)
        assert shape is not None and shape.bytes <= need and shape.micro_batch >= least
        assert choose_shape(cfg, 10**6, 10**4, need - 1, 8, longest, passes, ("bfloat16",), least=least) is None


def test_checkpointing_only_where_it_saves_more_than_half_the_passes() -> None:
    """Without gradient checkpointing where that takes at most twice the passes (a pass of it costs
    about 1.5x one without), with it where the plain shape would need more passes than that."""
    cfg = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4}

    def need(micro: int, ckpt: bool) -> int:
        return train_bytes(cfg, 10**6, 10**4, 2, micro, 64, ckpt, 1)

    for plain_fits, want in [(8, (8, False)), (4, (4, False)), (3, (8, True)), (2, (8, True))]:
        room = max(need(plain_fits, False), need(8, True))
        assert need(plain_fits + 1, False) > room or plain_fits == 8
        shape = choose_shape(cfg, 10**6, 10**4, room, 8, 64, 1, ("bfloat16",))
        assert shape is not None and (shape.micro_batch, shape.checkpointing) == want and shape.bytes <= room
        assert shape.weights_dtype == "bfloat16"


def test_bad_inputs_exit_2(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args(models, tmp_path / "out")
    args[args.index("--adapter") + 1] = str(tmp_path / "no-such-adapter")
    code, _out, err = run_cli(args, capsys)
    assert code == 2 and "no-such-adapter" in one_error_line(err)
    code, _out, err = run_cli([*cli_args(models, tmp_path / "out"), "--texts", str(tmp_path / "none.txt")], capsys)
    assert code == 2 and "--texts" in one_error_line(err)
    bad = [
        ({"init": "transfer", "lora_rank": 4}, "cannot start from the transfer"),
        ({"init": "transfer", "lora_alpha": 4.0}, "cannot start from the transfer"),
        ({"objective": "mse"}, "unknown objective"),
        ({"init": "zeros"}, "unknown init"),
        ({"steps": 0}, "--steps"),
        ({"lora_rank": 0}, "--lora-rank"),
        ({"head_subset": "top"}, "unknown head_subset"),
        ({"head_subset": "texts", "objective": "delta"}, "lm objective only"),
    ]
    for kw, msg in bad:
        with pytest.raises(InputError, match=msg):
            refine(models, tmp_path / "lib", **kw)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_and_init_trains(models: dict[str, Path], tmp_path: Path, objective: str, init: str) -> None:
    report = refine(models, tmp_path / "out", objective=objective, init=init)
    assert (report["summary"]["objective"], report["summary"]["init"]) == (objective, init)
    steps = report["refine"]["losses"]
    part = {"lm": "nll", "delta": "mse", "lm+kl": "kl", "lm-excess": "nll", "pair": "pair", "alm": "alm", "lm+soft": "soft"}[objective]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) and math.isfinite(r[part]) for r in steps)
    assert (report["refine"]["probe_set"]["contrast"] > 0) == (objective in ("delta", "lm+kl", "pair", "alm"))
    # the source base's texts are sampled only for the objectives that train on them
    assert (report["refine"]["probe_set"]["texts"]["base"] > 0) == (objective in ("delta", "lm+kl", "pair", "alm"))
    assert ("transfer" in report["summary"]["phase_seconds"]) == (init == "transfer")
    if objective == "lm+soft":  # the char and merge tokenizers share every character: most positions carry a set
        ps = report["refine"]["probe_set"]
        assert 0.5 * ps["scored_tokens"] < ps["soft_positions"] <= ps["scored_tokens"] and all(r["soft"] > 0 for r in steps)
        texts = json.loads((tmp_path / "out" / PROBES_NAME).read_text())["texts"]
        assert all(len(t["source_next"]) == len(t["source_token_delta"]) for t in texts)
    assert all(torch.isfinite(v).all() for v in read_tensors(tmp_path / "out" / "adapter_model.safetensors").values())


def test_a_softmax_over_the_texts_ids_trains_and_is_its_own_run(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """head_subset "texts" (a candidate): the lm loss's softmax over the training texts' ids only. Its
    per-token loss is below the full softmax's on the same first batch (fewer entries to share the
    probability), it trains, the report's options name it, and the written adapter differs."""
    full = refine(models, tmp_path / "full")
    part = refine(models, tmp_path / "part", head_subset="texts", log=print)
    assert "head_subset" not in full["options"] and part["options"]["head_subset"] == "texts"
    assert "token ids of the training texts" in capsys.readouterr().out
    lf, lp = full["refine"]["losses"], part["refine"]["losses"]
    assert all(math.isfinite(r["loss"]) for r in lp) and lp[0]["nll"] < lf[0]["nll"] - 1e-3
    a = read_tensors(tmp_path / "full" / "adapter_model.safetensors")
    b = read_tensors(tmp_path / "part" / "adapter_model.safetensors")
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)


def test_transfer_init_starts_from_the_transfer(models: dict[str, Path], tmp_path: Path) -> None:
    from lowmem_crosslora import transfer

    transfer(models["adapter"], models["source"], models["target"], tmp_path / "transfer", device="cpu", dtype="float32", use_cache=False)
    refine(models, tmp_path / "out", init="transfer", lr=1e-7)
    a, b = read_tensors(tmp_path / "transfer" / "adapter_model.safetensors"), read_tensors(tmp_path / "out" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k  # two AdamW steps of at most lr each from the transfer
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_lm_objective_lowers_the_target_nll_on_its_probe_texts(models: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    report = refine(models, out, steps=6, lr=1e-2, batch=4, samples=6, contrast_samples=0)
    texts = [Probe(t["prompt"], t["text"], t["seed"], t["origin"]) for t in json.loads((out / PROBES_NAME).read_text())["texts"]]
    tok = AutoTokenizer.from_pretrained(models["target"])
    enc = [encode(tok, p) for p in texts]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["target"]), str(out))

    def nll() -> float:
        lp = [v for row in token_logprobs(model, enc, "cpu", 128) for v in row]
        return -sum(lp) / len(lp)

    with model.disable_adapter():
        before = nll()
    after = nll()
    assert after < before - 0.1, (before, after)  # about 4.88 -> 4.68 nats a token (the base is near uniform: ln 128 = 4.85)
    trained = [r["loss"] for r in report["refine"]["losses"]]
    assert trained[-1] < trained[0]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_micro_batches_take_the_step_of_the_whole_batch(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objective: str) -> None:
    """A budget with room for two texts per pass: the batch of four is split into passes whose gradients
    add up to the whole batch's, and no pass holds more texts than the memory model allowed for."""
    grads: list[torch.Tensor] = []
    passes: list[int] = []
    shapes: list[Any] = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure: Any = None) -> Any:
            grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    kw = {"objective": objective, "steps": 1, "batch": 4, "samples": 4}
    whole = refine(models, tmp_path / "whole", **kw)
    assert whole["summary"]["train_shape"]["micro_batch"] >= 4

    real_shape, real_loss = train_shape_mod.choose_shape, refine_mod.batch_loss

    def room_for_two(cfg: Any, params: int, lora: int, room: int, batch: int, longest: int, n_passes: int, dtypes: Any, **kw: Any) -> Any:
        room = train_bytes(cfg, params, lora, 2, 2, longest, True, n_passes) + kw.get("extra", 0)  # two texts, checkpointing
        shapes.append(real_shape(cfg, params, lora, room, batch, longest, n_passes, dtypes, **kw))
        return shapes[-1]

    lengths: list[list[int]] = []

    def counting(model: Any, obj: str, main: list[TrainText], contrast: list[TrainText], *a: Any) -> Any:
        passes.append(len(main) + len(contrast))
        lengths.append([len(t.ids) for t in main])
        return real_loss(model, obj, main, contrast, *a)

    monkeypatch.setattr(train_shape_mod, "choose_shape", room_for_two)
    monkeypatch.setattr(refine_mod, "batch_loss", counting)
    split = refine(models, tmp_path / "split", **kw)
    # room for two texts with checkpointing: two a pass with it, or fewer without (choose_shape's rule)
    assert shapes[0].micro_batch == split["summary"]["train_shape"]["micro_batch"] <= 2
    assert shapes[0].checkpointing or shapes[0].micro_batch == 1
    assert len(passes) >= 2 and max(passes) <= shapes[0].micro_batch, passes
    if not uses_contrast(objective):  # the step's texts shortest first, so each pass pads the least
        flat = [n for pas in lengths for n in pas]
        assert flat == sorted(flat), lengths
    assert split["refine"]["losses"][0]["loss"] == pytest.approx(whole["refine"]["losses"][0]["loss"], rel=1e-3)
    g_whole, g_split = grads
    assert g_whole.norm() > 0
    assert (g_split - g_whole).norm() <= 3e-2 * g_whole.norm()  # bfloat16 weights: about 2e-3 apart; a wrong accumulation is ~1


# ---- verify and transfer --refine -----------------------------------------------------------------


def test_verify_grades_a_refined_adapter_on_fresh_samples(models: dict[str, Path], refined: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = refined["out"]
    trained = json.loads((out / PROBES_NAME).read_text())["texts"]
    common = {"samples": 4, "neutral_samples": 2, "max_new_tokens": 12, "device": "cpu"}
    r = run_verify(models["source"], models["adapter"], models["target"], out, prompts=PROMPTS, **common)
    assert r["options"]["seed"] == 1
    held = json.loads((out / PROBES_NAME).read_text())["holdout"]
    on = {"seed": 0, "texts": len(trained), "holdout_seed": held["seed"], "holdout_texts": len(held["texts"])}
    assert r["options"]["refined_on"] == {**on, "dropped_overlaps": 0}
    assert r["verify"]["sets"]["adapter"]["stands_for"].startswith("fresh samples (seed 1; refine trained on seed 0's)")
    assert not {(t["prompt"], t["text"]) for t in r["texts"]} & {(t["prompt"], t["text"]) for t in trained}

    # Its own training seed on its own prompts is refused, in the library and on the command line.
    with pytest.raises(InputError, match="refined on texts sampled with seed 0"):
        run_verify(models["source"], models["adapter"], models["target"], out, prompts=PROMPTS, seed=0, **common)
    args = ["verify", "--source", str(models["source"]), "--adapter", str(models["adapter"]), "--target", str(models["target"])]
    args += ["--transferred", str(out), "--prompts", str(models["prompts"]), "--seed", "0", "--samples", "4", "--max-new-tokens", "12", "--device", "cpu"]
    code, _out, err = run_cli(args, capsys)
    assert code == 2 and "pass another --seed" in one_error_line(err)

    # Seed 0 on a third prompt as well is allowed, and the two prompts' samples (refine's own texts, drawn
    # again with the same per-prompt seeds) are dropped: only the new prompt's texts are scored.
    more = {**common, "samples": 6, "neutral_samples": 3}
    r = run_verify(models["source"], models["adapter"], models["target"], out, prompts=[*PROMPTS, "Notes:"], seed=0, **more)
    assert r["options"]["refined_on"] == {**on, "dropped_overlaps": len(trained)}
    assert {t["prompt"] for t in r["texts"] if t["origin"] == "adapter"} == {"Notes:"}
    # "lm" samples no texts from the source base, so verify's neutral samples are none of refine's: all kept
    assert sum(t["origin"] == "base" for t in r["texts"]) == 3


def test_transfer_refine_on_the_command_line(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """transfer --refine writes a refined folder: the library's refine with the same options and the user's texts too."""
    texts = tmp_path / "mine.txt"
    texts.write_text("A text of my own about the weather.\n\nAnother one, a short story.\n")
    out = tmp_path / "out"
    args = ["transfer", "--adapter", str(models["adapter"]), "--source", str(models["source"]), "--target", str(models["target"]), "--out", str(out)]
    args += ["--refine", "--steps", "2", "--batch", "2", "--samples", "4", "--contrast-samples", "2", "--max-new-tokens", "12"]
    args += ["--prompts", str(models["prompts"]), "--texts", str(texts), "--device", "cpu", "--json"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kind"] == "refine" and report == json.loads((out / "crosslora_report.json").read_text())
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert report["refine"]["probe_set"]["texts"]["user"] == 2
    user = [t for t in probe_texts(out) if t["origin"] == "user"]
    assert [(t["prompt"], t["text"], t["seed"]) for t in user] == [("", "A text of my own about the weather.", None), ("", "Another one, a short story.", None)]
    refine(models, tmp_path / "lib", texts=texts)
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "lib")


def test_quiet_prints_the_verdict_only(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """refine --quiet, like verify --quiet: the held-out verdict and nothing else, never a silent result."""
    code, out, err = run_cli(cli_args(models, tmp_path / "out", "--quiet"), capsys)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("held out: "), out
    assert not [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln], err


def test_a_missing_tokenizer_leaves_nothing_behind(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 17, class 7: refused before any work (the target has no tokenizer): exit 2, one line, no
    output and no state folder beside it."""
    bare = tmp_path / "bare-target"
    shutil.copytree(models["target"], bare)
    for f in list(bare.iterdir()):
        if "token" in f.name or f.name == "special_tokens_map.json":
            f.unlink()
    out = tmp_path / "out"
    code, _out, err = run_cli(cli_args({**models, "target": bare}, out), capsys)
    assert code == 2 and "no tokenizer" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare-target"]


def test_a_finished_refine_rerun_is_kept(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As a transfer's: the same command again keeps the finished output (same bytes), says so, and
    does no work; other options still meet the non-empty folder."""
    out = tmp_path / "out"
    code, _out, err = run_cli(cli_args(models, out), capsys)
    assert code == 0, err
    before = adapter_bytes(out)
    code, _out, err = run_cli(cli_args(models, out), capsys)
    assert code == 0 and "already holds this refine; kept" in err and "sampling" not in err, err
    assert adapter_bytes(out) == before
    code, _out, err = run_cli(cli_args(models, out, "--lr", "0.01"), capsys)
    assert code == 2 and "not empty" in one_error_line(err)


def test_an_onpolicy_round_trains_on_the_targets_own_texts_and_resumes_to_the_same_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    """onpolicy=N (a benchmark candidate): halfway through, the target + LoRA writes N texts, the source
    scores them, and every later step adds the "delta" loss on them. Its texts are kept: a run stopped
    after the round resumes without sampling or loading the source again, to the same bytes."""
    from lowmem_crosslora.commands.refine import ONPOLICY_NAME

    kw = {"steps": 4, "onpolicy": 4}
    logs: list[str] = []
    report = refine(models, tmp_path / "ref", log=logs.append, **kw)
    steps = report["refine"]["losses"]
    assert [("onpolicy_mse" in r) for r in steps] == [False, False, True, True]  # the round runs after step 2 of 4
    assert all(math.isfinite(r["onpolicy_mse"]) for r in steps[2:])
    info = report["refine"]["probe_set"]["onpolicy"]
    assert info["at_step"] == 2 and 0 < info["texts"] <= 4 and report["options"]["onpolicy"] == 4
    kept = json.loads((tmp_path / "ref" / ONPOLICY_NAME).read_text())
    assert {t["origin"] for t in kept["texts"]} == {"onpolicy"} and all(len(t["source_token_delta"]) == len(t["source_token_ends"]) for t in kept["texts"])
    assert sum("on-policy round at step 2" in line for line in logs) == 1
    # not the same adapter as without the round
    assert adapter_bytes(tmp_path / "ref") != adapter_bytes(_refined_plain(models, tmp_path))

    with pytest.raises(Interrupted):
        refine(models, tmp_path / "out", progress=stop_at(3), **kw)
    state = state_dir_for(tmp_path / "out", "refine")
    assert (state / ONPOLICY_NAME).exists()
    logs = []
    refine(models, tmp_path / "out", log=logs.append, **kw)
    assert "resuming at step 3 of 4" in logs and not any("on-policy round" in line or "sampling" in line for line in logs)
    assert losses(tmp_path / "out") == losses(tmp_path / "ref")
    assert adapter_bytes(tmp_path / "out") == adapter_bytes(tmp_path / "ref")
    assert json.loads((tmp_path / "out" / ONPOLICY_NAME).read_text())["texts"] == kept["texts"]


def _refined_plain(models: dict[str, Path], tmp_path: Path) -> Path:
    refine(models, tmp_path / "plain", steps=4)
    return tmp_path / "plain"


def test_a_best_of_n_round_keeps_the_texts_the_source_adapter_prefers_and_trains_them_with_lm(models: dict[str, Path], tmp_path: Path) -> None:
    """onpolicy_keep=s: the round keeps the share s of the target's texts whose change under the source
    adapter (log-likelihood per byte) is highest, and later steps add the LM loss on them."""
    from lowmem_crosslora.commands.refine import preferred

    def text(delta: list[float], nbytes: int) -> TrainText:
        return TrainText([1, 2, 3], 1, [0] * 2, delta, "onpolicy", nbytes)

    texts = [text([1.0], 10), text([-5.0], 5), text([3.0], 2), text([1.0], 10)]  # per byte: 0.1, -1, 1.5, 0.1
    kept, info = preferred(texts, 0.5)
    assert kept == [texts[0], texts[2]]  # the best two, in their order; a tie goes to the earlier text
    assert info["kept"] == 2 and info["sampled"] == 4 and info["kept_preference"] == pytest.approx(0.8) and info["dropped_preference"] == pytest.approx(-0.45)
    assert preferred(texts, 0.01)[0] == [texts[2]]  # at least one

    report = refine(models, tmp_path / "out", steps=4, onpolicy=4, onpolicy_keep=0.5)
    steps = report["refine"]["losses"]
    assert [("onpolicy_nll" in r) for r in steps] == [False, False, True, True] and not any("onpolicy_mse" in r for r in steps)
    info = report["refine"]["probe_set"]["onpolicy"]
    assert info["kept"] == math.ceil(info["sampled"] / 2) and info["kept_preference"] >= info["dropped_preference"]
    assert report["options"]["onpolicy_keep"] == 0.5
