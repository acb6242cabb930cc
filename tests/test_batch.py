"""Batch transfers: several adapters of one source model onto one target in one run. Each base
matrix is factored once for all of them, and each output is byte-identical to a transfer of that
adapter alone."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import run_cli, run_module

import lowmem_crosslora
from lowmem_crosslora.services import factoring as engine_mod

SRC, TGT = "llama", "llama_wide"  # 3 -> 4 layers: with --layer-map depth two target layers share a source layer
OPTS = {"rank": 16, "device": "cpu", "layer_map": "depth", "exact_ratio": 0.8}
FILES = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def adapters(zoo):
    """Three adapters that differ in rank, alpha, targeted modules and layers."""
    return {
        "full": zoo.adapter(SRC),
        "attn": zoo.adapter(SRC, "batch-attn", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
        "mlp": zoo.adapter(SRC, "batch-mlp", r=6, lora_alpha=6, use_rslora=True, target_modules=["gate_proj", "down_proj"], layers_to_transform=[0, 2]),
    }


@pytest.fixture(scope="module")
def singles(zoo, adapters, tmp_path_factory):
    """Each adapter transferred alone (no basis cache, so nothing is shared between them)."""
    root = tmp_path_factory.mktemp("singles")
    outs = {}
    for name, ad in adapters.items():
        outs[name] = root / name
        lowmem_crosslora.transfer(ad, zoo.model(SRC), zoo.model(TGT), outs[name], use_cache=False, **OPTS)
    return outs


def count_factorizations(monkeypatch) -> Counter:
    calls: Counter = Counter()
    real = engine_mod.Engine.factor

    def counting(self, job, mplan, preloaded=None):
        calls[(job.role, job.weight)] += 1
        return real(self, job, mplan, preloaded)

    monkeypatch.setattr(engine_mod.Engine, "factor", counting)
    return calls


def test_batch_factors_each_matrix_once_and_matches_single_runs(zoo, adapters, singles, tmp_path, monkeypatch):
    calls = count_factorizations(monkeypatch)
    pairs = [(ad, tmp_path / name) for name, ad in adapters.items()]
    reports = lowmem_crosslora.transfer_batch(pairs, zoo.model(SRC), zoo.model(TGT), use_cache=False, **OPTS)
    assert len(reports) == 3
    # once per base matrix for all three adapters: the union of their units' weights, no more
    assert calls and max(calls.values()) == 1
    needed = set()
    for rep in reports:
        for u in rep["units"]:
            needed.add(("target", f"model.layers.{u['target_layer']}.{u['target_module'].split('.', 3)[3]}.weight"))
    assert {k for k in calls if k[0] == "target"} == needed
    # two target layers share source layer 1 under the depth map: factored once all the same
    assert sum(1 for role, _ in calls if role == "source") < sum(1 for role, _ in calls if role == "target")
    for name, rep in zip(adapters, reports, strict=True):
        out = tmp_path / name
        for f in FILES:
            assert (out / f).read_bytes() == (singles[name] / f).read_bytes(), f"{name}/{f} differs from the single run"
        assert rep["summary"]["batch"] == {"adapters": 3, "transferred_in_this_run": 3}
        assert rep["summary"]["units"] == len(json.loads((singles[name] / "crosslora_report.json").read_text())["units"])


def test_batch_through_the_cli_with_a_folder_of_adapters(zoo, adapters, singles, tmp_path, capsys):
    lib = tmp_path / "library"
    lib.mkdir()
    for name, ad in adapters.items():
        (lib / name).symlink_to(ad, target_is_directory=True)
    (lib / "notes").mkdir()  # a folder that is not an adapter is not picked up
    out = tmp_path / "moved"
    args = ["transfer", "--adapter", str(lib), "--source", str(zoo.model(SRC)), "--target", str(zoo.model(TGT)), "--out", str(out)]
    args += ["--rank", "16", "--device", "cpu", "--layer-map", "depth", "--no-cache", "--json"]
    rc, stdout, stderr = run_cli(args, capsys)
    assert rc == 0, stderr
    reports = json.loads(stdout)
    assert len(reports) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(adapters)
    # the CLI's exact_ratio is the default: compare against the library run at the same setting
    ref = tmp_path / "ref-attn"
    lowmem_crosslora.transfer(adapters["attn"], zoo.model(SRC), zoo.model(TGT), ref, use_cache=False, rank=16, device="cpu", layer_map="depth")
    assert (out / "attn" / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()

    # Run again: every output already holds this transfer, so nothing is redone or touched.
    stamp = {p.name: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in out.iterdir()}
    rc, stdout, stderr = run_cli([a for a in args if a != "--json"], capsys)
    assert rc == 0, stderr
    assert stderr.count("already holds this transfer") == 3
    assert stamp == {p.name: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in out.iterdir()}

    # Another option changes the result: the finished outputs are not this transfer, so they are refused.
    rc, stdout, stderr = run_cli([*args[:-1], "--seed", "7"], capsys)
    assert rc == 2 and "not empty" in stderr


def test_bad_adapter_in_a_batch_fails_before_any_work(zoo, adapters, tmp_path, capsys):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "adapter_config.json").write_text("{not json")
    out = tmp_path / "out"
    args = ["transfer", "--adapter", str(adapters["full"]), "--adapter", str(bogus), "--source", str(zoo.model(SRC))]
    args += ["--target", str(zoo.model(TGT)), "--out", str(out), "--rank", "16", "--device", "cpu", "--no-cache", "--quiet"]
    rc, stdout, stderr = run_cli(args, capsys)
    assert rc == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bogus" in lines[0], stderr
    assert not out.exists() or not any(out.iterdir())


def test_adapters_with_one_folder_name_are_refused(zoo, adapters, tmp_path, capsys):
    a, b = tmp_path / "x" / "same", tmp_path / "y" / "same"
    for link, ad in ((a, adapters["full"]), (b, adapters["attn"])):
        link.parent.mkdir()
        link.symlink_to(ad, target_is_directory=True)
    args = ["transfer", "--adapter", str(a), "--adapter", str(b), "--source", str(zoo.model(SRC)), "--target", str(zoo.model(TGT))]
    args += ["--out", str(tmp_path / "out"), "--rank", "16", "--device", "cpu", "--quiet"]
    rc, _, stderr = run_cli(args, capsys)
    assert rc == 2 and "same" in stderr and "collide" in stderr


def test_killed_batch_resumes_to_the_same_bytes(zoo, adapters, tmp_path):
    """SIGKILL in the middle of a batch; the same command finishes every output, byte-identical to
    an uninterrupted batch."""
    ref = tmp_path / "ref"
    pairs = [(ad, ref / ad.name) for ad in adapters.values()]  # the CLI names each output after its adapter folder
    lowmem_crosslora.transfer_batch(pairs, zoo.model(SRC), zoo.model(TGT), use_cache=False, rank=16, device="cpu", layer_map="depth")

    out = tmp_path / "out"
    args = ["transfer", "--source", str(zoo.model(SRC)), "--target", str(zoo.model(TGT)), "--out", str(out)]
    for ad in adapters.values():
        args += ["--adapter", str(ad)]
    args += ["--rank", "16", "--device", "cpu", "--layer-map", "depth", "--no-cache", "--quiet"]
    import os

    os.environ["LOWMEM_CROSSLORA_TEST_KILL"] = "after_unit:3"
    try:
        rc, _, _ = run_module(args)
    finally:
        del os.environ["LOWMEM_CROSSLORA_TEST_KILL"]
    assert rc == -9
    assert any(p.name.endswith(".crosslora-partial") for p in out.iterdir())
    rc, _, stderr = run_module(args)
    assert rc == 0, stderr
    for ad in adapters.values():
        assert (out / ad.name / "adapter_model.safetensors").read_bytes() == (ref / ad.name / "adapter_model.safetensors").read_bytes()
    assert not any(p.name.startswith(".") for p in out.iterdir())
