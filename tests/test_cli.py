"""The command line: plan, inspect, demo, transfer's console output, --help, --version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli, run_module

import lowmem_crosslora


@pytest.fixture(scope="module")
def inputs(zoo):
    return {"adapter": zoo.adapter("llama"), "source": zoo.model("llama"), "target": zoo.model("qwen2")}


def io_args(inputs, *extra: str) -> list[str]:
    return [
        *("--adapter", str(inputs["adapter"]), "--source", str(inputs["source"]), "--target", str(inputs["target"])),
        *("--rank", "16", "--device", "cpu", *extra),
    ]


def test_plan_json_agrees_with_the_transfer(capsys, inputs, tmp_path):
    rc, out, err = run_cli(["plan", *io_args(inputs), "--json"], capsys)
    assert rc == 0, err
    plan = json.loads(out)
    assert {"units", "skipped", "estimate", "target_modules"} <= set(plan)
    report = lowmem_crosslora.transfer(inputs["adapter"], inputs["source"], inputs["target"], tmp_path / "out", rank=16, device="cpu")
    assert [u["uid"] for u in plan["units"]] == [u["uid"] for u in report["units"]]
    for p, r in zip(plan["units"], report["units"], strict=True):
        for key in ("source_layer", "target_layer", "source_module", "target_module", "source_shape", "target_shape", "r"):
            assert p[key] == r[key], key
        assert set(p["svd"]) == {"source", "target"}
    assert sorted(s["tensor"] for s in plan["skipped"]) == sorted(s["tensor"] for s in report["skipped"])
    assert len(plan["skipped"]) == 7 and all("deeper" in s["reason"] for s in plan["skipped"])
    est = plan["estimate"]
    assert est["device"] == "cpu" and est["seconds"] >= 0 and est["base_matrices"] > 0
    assert re.fullmatch(r"[0-9.]+ (B|KiB|MiB|GiB)", est["min_host_budget"])
    # the plan computed nothing and wrote nothing
    assert not (tmp_path / "plan-out").exists()


def test_plan_table(capsys, inputs):
    rc, out, err = run_cli(["plan", *io_args(inputs)], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["unit", "source", "target"]
    units = [ln for ln in lines if re.match(r"^\d+\.(q|k|v|o|gate|up|down)\s", ln)]
    assert len(units) == 2 * 7
    assert any("L0 q 64x64" in ln and "L0 q 48x48" in ln for ln in units)
    skips = [ln for ln in lines if ln.startswith("skip ")]
    assert len(skips) == 7 and all("model.layers.2." in ln for ln in skips)
    assert re.search(r"14 units, \d+ base matrices", lines[-1])
    assert "smallest workable budget" in lines[-1]


def test_plan_depth_map(capsys, zoo):
    args = ["--adapter", str(zoo.adapter("llama")), "--source", str(zoo.model("llama")), "--target", str(zoo.model("llama_wide"))]
    args += ["--layer-map", "depth", "--json"]
    rc, out, err = run_cli(["plan", *args], capsys)
    assert rc == 0, err
    plan = json.loads(out)
    assert sorted({(u["target_layer"], u["source_layer"]) for u in plan["units"]}) == [(0, 0), (1, 1), (2, 1), (3, 2)]
    # a source basis used by two target layers is factored once
    assert any(u["svd"]["source"] == "reused" for u in plan["units"])
    assert plan["skipped"] == []


def test_plan_bad_input_is_one_line(capsys, inputs, tmp_path):
    rc, out, err = run_cli(["plan", *io_args({**inputs, "target": tmp_path / "nope"})], capsys)
    assert rc == 2
    assert err.strip().count("\n") == 0 and err.startswith("error:") and "Traceback" not in err


def test_inspect_model(capsys, zoo):
    path = zoo.model("gemma2", sharded=True)
    rc, out, err = run_cli(["inspect", str(path)], capsys)
    assert rc == 0, err
    fields = dict(re.split(r"\s+", ln, maxsplit=1) for ln in out.strip().splitlines())
    assert fields["kind"] == "model" and fields["model_type"] == "gemma2"
    assert fields["head_dim"] == "24" and fields["hidden"] == "48" and fields["kv_heads"] == "2"
    rc, out, err = run_cli(["inspect", str(path), "--json"], capsys)
    info = json.loads(out)
    assert info["modules"]["q"] == [96, 48]  # head_dim * heads != hidden
    assert info["modules"]["k"] == [48, 48] and info["modules"]["o"] == [48, 96]
    assert info["layers"] == 3 and info["files"] > 1
    assert info["dtypes"] == {"F32": info["tensors"]}


def test_inspect_bf16_model(capsys, zoo):
    rc, out, err = run_cli(["inspect", str(zoo.model("gemma3_text")), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["model_type"] == "gemma3_text" and "BF16" in info["dtypes"]


def test_inspect_adapter(capsys, zoo):
    ad = zoo.adapter("llama", "patterned", use_rslora=True, rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32, "o_proj": 8})
    rc, out, err = run_cli(["inspect", str(ad), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["kind"] == "adapter" and info["peft_type"] == "LORA"
    assert info["r"] == 8 and info["lora_alpha"] == 16 and info["use_rslora"] is True
    assert info["ranks"] == [2, 4, 8]
    assert info["modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert info["lora_modules"] == 21 and info["dtype"] == ["F32"]
    assert info["rank_pattern"] and info["alpha_pattern"]
    rc, out, err = run_cli(["inspect", str(ad)], capsys)
    assert rc == 0 and re.search(r"^kind\s+adapter$", out, re.M) and re.search(r"^use_rslora\s+True$", out, re.M)


def test_inspect_neither(capsys, tmp_path):
    rc, out, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert rc == 2 and err.startswith("error:") and "neither" in err
    rc, out, err = run_cli(["inspect", str(tmp_path / "missing")], capsys)
    assert rc == 2 and err.startswith("error:")


def test_transfer_prints_a_summary_and_json(capsys, inputs, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(["transfer", *io_args(inputs), "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert "energy retained: mean" in out and f"wrote {out_dir}" in out
    assert "skipped 7 tensors" in out
    assert "Traceback" not in err
    rc, out, err = run_cli(["transfer", *io_args(inputs), "--out", str(tmp_path / "q"), "--quiet"], capsys)
    assert rc == 0 and out == "" and err == ""
    report_file = tmp_path / "r.json"
    rc, out, err = run_cli(["transfer", *io_args(inputs), "--out", str(tmp_path / "j"), "--json", "--report", str(report_file)], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report == json.loads(report_file.read_text()) == json.loads((tmp_path / "j" / "crosslora_report.json").read_text())
    assert len(report["units"]) == 14


def test_demo_prints_energy(capsys):
    rc, out, err = run_cli(["demo", "--quiet"], capsys)
    assert rc == 0, err
    energies = re.findall(r"^\d+\.(?:q|k|v|o|gate|up|down)\s.*\s(\d\.\d{3})$", out, re.M)
    assert len(energies) >= 7
    assert all(0.0 < float(e) <= 1.0 for e in energies)
    m = re.search(r"energy retained: mean (\d\.\d+), min (\d\.\d+), max (\d\.\d+)", out)
    assert m and float(m.group(2)) <= float(m.group(1)) <= float(m.group(3))
    assert "adapter_config.json, adapter_model.safetensors, crosslora_report.json" in out


def test_demo_verifies_and_refines_offline(capsys, tmp_path):
    """The demo pair has character tokenizers, so verify and refine run on it with no download."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    rc, out, err = run_cli(["demo", "--quiet", "--verify", "--refine", "--keep", str(tmp_path / "demo")], capsys)
    assert rc == 0, err
    assert "keeps" in out and "standard errors" in out  # verify's verdict
    assert re.search(r"^refined in \d+ s: on 8 held-out probe texts", out, re.M)
    refined = tmp_path / "demo" / "lora-on-qwen2-refined"
    assert sorted(p.name for p in refined.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "crosslora_report.json", "refine_probes.json"]
    for model in ("source-llama", "target-qwen2"):
        assert (tmp_path / "demo" / model / "tokenizer.json").is_file()


def test_help(capsys):
    rc, out, err = run_cli(["--help"], capsys)
    assert rc == 0
    for cmd in ("transfer", "plan", "inspect", "demo"):
        assert cmd in out
    rc, out, err = run_cli(["transfer", "--help"], capsys)
    assert rc == 0
    options = ["--adapter", "--source", "--target", "--out", "--rank", "--layer-map", "--device", "--dtype", "--seed"]
    options += ["--max-memory", "--max-gpu-memory", "--resume", "--report", "--quiet", "--force"]
    for opt in options:
        assert opt in out, opt


def test_usage_errors_exit_2(capsys):
    rc, out, err = run_cli(["transfer"], capsys)
    assert rc == 2 and "Missing option" in err and "Traceback" not in err
    rc, out, err = run_cli(["no-such-command"], capsys)
    assert rc == 2 and "Traceback" not in err


def test_version_through_python_m():
    rc, out, err = run_module(["--version"])
    assert rc == 0, err
    assert out.strip() == f"lowmem-crosslora, version {lowmem_crosslora.__version__}"


def test_ctrl_c_while_torch_imports_is_one_line_and_exit_130() -> None:
    """SIGINT during start-up (torch is still importing) ends like one during the work: no traceback."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-m", "lowmem_crosslora", "--version"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("start-up finished before the signal (a fast machine): nothing to interrupt")
    assert p.returncode == 130 and "Traceback" not in err and err.strip() == "interrupted", err


def test_plan_columns_line_up_with_blocked_svds(capsys, tmp_path):
    """A blocked SVD names its rows in the svd column; every row keeps the columns aligned."""
    rc, _out, err = run_cli(["demo", "--quiet", "--keep", str(tmp_path / "d")], capsys)
    assert rc == 0, err
    d = tmp_path / "d"
    args = ["plan", "--adapter", str(d / "lora-on-llama"), "--source", str(d / "source-llama"), "--target", str(d / "target-qwen2")]
    # --max-memory counts the whole process: a fresh process's baseline plus 9 MB of working room.
    rc, out, err = run_module([*args, "--json"])
    baseline = json.loads(out)["estimate"]["baseline_host_bytes"]
    rc, out, err = run_module([*args, "--max-memory", str(baseline + 9 * 10**6)])
    assert rc == 0, err
    table = [ln for ln in out.splitlines() if re.match(r"^(unit|\d+\.\w+)\s", ln)]
    assert any("blocked/" in ln for ln in table)
    assert len({len(ln) for ln in table}) == 1  # 'est s' ends in one column on every row


def test_quiet_prints_warnings_only(capsys, inputs, tmp_path):
    """--quiet: no progress, no log lines, no summary on a clean run; a warning still reaches stderr."""
    args = ["transfer", "--adapter", str(inputs["adapter"]), "--source", str(inputs["source"]), "--target", str(inputs["target"])]
    rc, out, err = run_cli([*args, "--out", str(tmp_path / "a"), "--device", "cpu", "--rank", "16", "--no-cache", "--quiet"], capsys)
    assert rc == 0 and out == "" and err == "", (out, err)
    args = ["transfer", "--adapter", str(inputs["adapter"]), "--source", str(inputs["source"]), "--target", str(inputs["source"])]
    rc, out, err = run_cli([*args, "--out", str(tmp_path / "b"), "--device", "cpu", "--rank", "16", "--no-cache", "--quiet"], capsys)
    assert rc == 0 and out == "", out
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "warning: source and target are the same model: the transfer can only truncate the adapter to rank r"
    ], err
