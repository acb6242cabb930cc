"""The compute dtype (services/compute.py): the bfloat16-speed decision (forced either way in tests),
the upcast path (bfloat16 storage, float32 compute) against float64 references, and refine on both
paths with the tiny llama -> qwen2 pair of test_refine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAST_REFINE, PROMPTS, fast_refine, refine_pair

pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowmem_crosslora.commands import refine as refine_mod  # noqa: E402
from lowmem_crosslora.services import compute  # noqa: E402
from lowmem_crosslora.services import train_shape as train_shape_mod  # noqa: E402
from lowmem_crosslora.services.compute import UpcastMatmul, bf16_speed, upcast_model  # noqa: E402
from lowmem_crosslora.services.train_shape import TrainShape  # noqa: E402

FAST = FAST_REFINE


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return refine_pair(tmp_path_factory.mktemp("compute"))


refine = fast_refine


def test_the_decision_can_be_forced_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bf16_speed("cpu", force=True).fast and bf16_speed("cpu", force=True).compute_dtype == "bfloat16"
    assert not bf16_speed("cpu", force=False).fast and bf16_speed("cpu", force=False).compute_dtype == "float32"
    monkeypatch.setattr(compute, "FORCE", False)
    assert not bf16_speed("cpu").fast and "forced slow" in bf16_speed("cpu").reason
    monkeypatch.setattr(compute, "FORCE", True)
    assert bf16_speed("cpu").fast
    assert not bf16_speed("cpu", force=False).fast  # the argument wins over the module's setting


def test_the_measured_decision_is_timed_once_and_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no CPU flags are listed (macOS, Windows) a short timing decides, once per process."""
    monkeypatch.setattr(compute, "_CACHE", {})
    monkeypatch.setattr(compute, "_cpu_flags", lambda: None)
    calls: list[str] = []
    real = compute._timing
    monkeypatch.setattr(compute, "_timing", lambda dev: calls.append(dev) or real(dev))
    a = bf16_speed("cpu")
    assert bf16_speed("cpu") is a and calls == ["cpu"]  # cached per process
    assert a.ratio is not None and a.ratio > 0 and "x float32's speed on this CPU" in a.reason
    assert a.fast == (a.ratio >= compute.FAST_RATIO)
    # Either answer follows from the timing alone: a slow bfloat16 product is "slow", a fast one "fast".
    monkeypatch.setattr(compute, "_timing", lambda dev: (1e-3, 0.3))
    assert not compute._measure("cpu").fast
    monkeypatch.setattr(compute, "_timing", lambda dev: (3e-3, 1e-3))
    assert compute._measure("cpu").fast


FLAG_CASES = [({"avx2", "amx_bf16"}, True), ({"avx2", "avx512_bf16"}, True), ({"fp", "asimd", "bf16"}, True), ({"avx2", "fma"}, False)]


@pytest.mark.parametrize(("flags", "fast"), FLAG_CASES)
def test_listed_cpu_flags_decide_without_timing(monkeypatch: pytest.MonkeyPatch, flags: set[str], fast: bool) -> None:
    """Where the kernel lists the CPU's flags they decide, the same way on every run (no timing noise)."""
    monkeypatch.setattr(compute, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(compute, "_timing", lambda dev: pytest.fail("timed although the flags decide"))
    speed = compute._measure("cpu")
    assert speed.fast is fast and speed.ratio is None and ("hardware" in speed.reason) is fast


@pytest.mark.parametrize("block_bytes", [compute.UPCAST_BLOCK_BYTES, 4 * 24 * 5])  # one block; blocks of 5 rows
def test_upcast_matmul_is_float32_compute_on_the_rounded_weights(monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    monkeypatch.setattr(compute, "UPCAST_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 24, generator=g).bfloat16()
    b = torch.randn(37, generator=g).bfloat16()
    x = torch.randn(3, 7, 24, generator=g, requires_grad=True)
    up = torch.randn(3, 7, 37, generator=g)
    out = UpcastMatmul.apply(x, w, b)
    assert out.dtype == torch.float32
    (out * up).sum().backward()
    ref = x.detach().double() @ w.double().T + b.double()
    gref = up.double() @ w.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert x.grad is not None
    torch.testing.assert_close(x.grad.double(), gref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_an_upcast_model_computes_like_the_rounded_model_in_float32(models: dict[str, Path], family: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = models["source"] if family == "llama" else models["target"]
    runs = []
    x = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    for upcast in (False, True):
        base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
        if upcast:
            assert upcast_model(base) > 0
            assert base.get_input_embeddings().weight.dtype == torch.bfloat16
        else:
            base = base.double()  # the float64 reference on the same bfloat16-rounded weights
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"]))
        g = torch.Generator().manual_seed(3)
        for _n, p in sorted(model.named_parameters()):
            if p.requires_grad:  # the same LoRA on both, float32 values (float64 on the reference)
                p.data = (0.1 * torch.randn(p.shape, generator=g)).to(torch.float32 if upcast else torch.float64)
        logits = model(input_ids=x, attention_mask=mask).logits
        (logits.double().log_softmax(-1)[..., 0].sum()).backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((logits.double().detach(), grads))
    (ref, gref), (got, ggot) = runs
    assert got.dtype == torch.float64 and runs[1][0].abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert gref.keys() == ggot.keys() and len(gref) > 0
    for n in gref:
        torch.testing.assert_close(ggot[n], gref[n], rtol=1e-3, atol=1e-4)


def test_shape_json_keeps_the_old_fields_and_reads_old_checkpoints() -> None:
    s = TrainShape(2, 64, True, "bfloat16", 123, "float32", "why")
    assert s.upcast and TrainShape.from_json(s.to_json()) == s
    old = {"micro_batch": 2, "max_len": 64, "gradient_checkpointing": True, "weights_dtype": "bfloat16", "modelled_bytes": 1}
    back = TrainShape.from_json(old)
    assert back.compute_dtype == "bfloat16" and not back.upcast


def _peft_check(out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), str(out))
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_refine_on_a_slow_bfloat16_cpu_trains_in_float32(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "FORCE", False)
    # float32 weights fit the tiny target: they are chosen
    report = refine(models, tmp_path / "f32")
    shape = report["summary"]["train_shape"]
    assert shape["weights_dtype"] == "float32" and shape["compute_dtype"] == "float32"
    assert "forced slow" in shape["compute"] and "float32 weights" in shape["compute"]
    _peft_check(tmp_path / "f32")
    # float32 weights do not fit: bfloat16 storage, float32 compute
    real = train_shape_mod.choose_shape

    def no_float32(*a: Any, **kw: Any) -> Any:
        return None if a[7] == ("float32",) else real(*a, **kw)

    monkeypatch.setattr(train_shape_mod, "choose_shape", no_float32)
    seen: list[int] = []
    real_upcast = refine_mod.upcast_model
    monkeypatch.setattr(refine_mod, "upcast_model", lambda m: seen.append(real_upcast(m)))
    logs: list[str] = []
    report = refine(models, tmp_path / "up", log=logs.append)
    shape = report["summary"]["train_shape"]
    assert shape["weights_dtype"] == "bfloat16" and shape["compute_dtype"] == "float32" and "bfloat16 weights, float32 compute" in shape["compute"]
    assert report["summary"]["dtypes"]["target"] == "bfloat16" and report["summary"]["dtypes"]["target_compute"] == "float32"
    assert seen and seen[0] > 0
    assert any("computing in float32" in line for line in logs)
    assert report["summary"]["steps"] == 2 and isinstance(report["summary"]["final_loss"], float)
    _peft_check(tmp_path / "up")


def test_refine_forced_fast_is_todays_path(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refine_mod, "upcast_model", lambda m: pytest.fail("the fast path never upcasts"))
    monkeypatch.setattr(compute, "FORCE", True)
    report = refine(models, tmp_path / "fast")
    shape = report["summary"]["train_shape"]
    assert shape["weights_dtype"] == "bfloat16" and shape["compute_dtype"] == "bfloat16" and "target_compute" not in report["summary"]["dtypes"]
    monkeypatch.setattr(compute, "FORCE", None)
    if not bf16_speed("cpu").fast:
        pytest.skip("bfloat16 is slow on this CPU: the measured path is the slow one")
    refine(models, tmp_path / "measured")
    same = (tmp_path / "fast" / "adapter_model.safetensors").read_bytes() == (tmp_path / "measured" / "adapter_model.safetensors").read_bytes()
    assert same


def test_scoring_loader_upcasts_when_only_bfloat16_fits_and_it_is_slow(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from lowmem_crosslora.io.safetensors_model import Checkpoint
    from lowmem_crosslora.services import scoring
    from lowmem_crosslora.services.memory import Budget
    from lowmem_crosslora.services.probes import sample_probes

    ck = Checkpoint(models["target"], "target")
    budget = Budget(None, None, "cpu")
    # room for bfloat16 weights (+ the upcast blocks), not for float32
    monkeypatch.setattr(scoring, "model_bytes", lambda c, name, dev="cpu": 10**12 if name == "float32" else 1000)
    need16 = int(1.15 * 1000) + 2 * scoring.LOGITS_BYTES + 64 * 1024**2 + compute.upcast_bytes(ck.config)
    monkeypatch.setattr(scoring, "room_left", lambda b, d: need16)
    monkeypatch.setattr(compute, "FORCE", False)
    loader = scoring.Loader(budget, "cpu", "auto", lambda m: None)
    model = loader.load(ck)
    assert loader.used == {"target": "bfloat16", "target_compute": "float32"}
    assert isinstance(model.get_output_embeddings(), compute.UpcastLinear)
    tok = loader.tokenizer(ck)
    probes = sample_probes(model, tok, PROMPTS, 2, max_new_tokens=6, seed=0, origin="base", device="cpu")
    assert len(probes) == 2
    # fast bfloat16: loaded as today
    monkeypatch.setattr(compute, "FORCE", True)
    loader = scoring.Loader(budget, "cpu", "auto", lambda m: None)
    loader.load(ck)
    assert loader.used == {"target": "bfloat16"}


def test_widen_reuses_one_block_and_equals_float() -> None:
    """`widen` copies into one reused scratch block (no fresh allocation per widening) and gives what
    `.float()` gives; float32 blocks pass through, and a block over the scratch size gets its own copy."""
    compute.release_scratch()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=g).bfloat16()
    a = compute.widen(w[:10])
    assert torch.equal(a, w[:10].float())
    ptr = a.data_ptr()
    b = compute.widen(w[10:30])
    assert torch.equal(b, w[10:30].float()) and b.data_ptr() == ptr  # the same block, reused
    f = torch.randn(3, 4, generator=g)
    assert compute.widen(f) is f
    compute.release_scratch()
    assert not compute._SCRATCH


def test_widen_keeps_blocks_over_the_scratch_size_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "UPCAST_BLOCK_BYTES", 4 * 24 * 5)
    compute.release_scratch()
    w = torch.randn(12, 24, generator=torch.Generator().manual_seed(2)).bfloat16()
    small = compute.widen(w[:5])
    big = compute.widen(w)
    assert torch.equal(big, w.float()) and big.data_ptr() != small.data_ptr()
    compute.release_scratch()


@pytest.mark.parametrize("upcast", [False, True])
def test_passes_without_gradients_take_as_many_texts_as_the_training_memory_allows(models: dict[str, Path], upcast: bool) -> None:
    """The scoring batch: never fewer texts than a training pass, at most `most`, and a checkpointed
    step of that many texts (more memory than a pass without gradients) fits the shape's modelled bytes."""
    from dataclasses import replace

    from lowmem_crosslora.io.safetensors_model import Checkpoint
    from lowmem_crosslora.services import scoring
    from lowmem_crosslora.services.train_shape import choose_shape, scoring_batch, train_bytes

    ck = Checkpoint(models["target"], "target")
    params = scoring.budgeted_params(ck, "bfloat16", "cpu")
    extra = compute.upcast_bytes(ck.config) if upcast else 0
    for room_texts in (1, 3):
        room = train_bytes(ck.config, params, 10**4, 2, room_texts, 40, False, 1) + extra
        shape = choose_shape(ck.config, params, 10**4, room, 8, 40, 1, ("bfloat16",), extra=extra)
        assert shape is not None
        if upcast:
            shape = replace(shape, compute_dtype="float32")
        n = scoring_batch(ck, 10**4, shape, 1, "cpu", 16)
        assert shape.micro_batch <= n <= 16
        assert n == shape.micro_batch or train_bytes(ck.config, params, 10**4, 2, n, shape.max_len, True, 1) + extra <= shape.bytes
        assert n == 16 or train_bytes(ck.config, params, 10**4, 2, n + 1, shape.max_len, True, 1) + extra > shape.bytes
    assert scoring_batch(ck, 10**4, shape, 1, "cpu", 1) == shape.micro_batch  # never fewer than a training pass


def test_checkpointing_is_enabled_without_the_deprecated_call() -> None:
    """enable_checkpointing turns checkpointing on through the name transformers keeps (no FutureWarning
    about `gradient_checkpointing_enable`), and falls back to the old name where only it exists (4.x)."""
    import warnings

    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    model = Qwen2ForCausalLM(cfg)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train_shape_mod.enable_checkpointing(model)
    assert not [w for w in seen if "gradient_checkpointing_enable" in str(w.message)]
    assert getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False))

    calls: list[dict[str, Any]] = []

    class OldModel:  # transformers 4.x: only the old name
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any]) -> None:
            calls.append(gradient_checkpointing_kwargs)

    train_shape_mod.enable_checkpointing(OldModel())
    assert calls == [{"use_reentrant": False}]
