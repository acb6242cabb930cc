"""Every bad input: exit code 2, exactly one clear line on stderr starting with 'error:', no
traceback, nothing under the final output name. A budget that cannot be met: exit code 3."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_tensors, run_cli, run_module, transfer_args
from safetensors.torch import load_file, save_file

from lowmem_crosslora.io.runstate import state_dir_for


class Boom:
    """Unpickling this creates a marker file: proof that a pickle was (or was not) opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.layers.0.self_attn.q_proj.weight": Boom(marker)}))


@pytest.fixture(scope="module")
def good(zoo):
    """Valid inputs: a llama adapter, llama source, qwen2 target."""
    return {"adapter": zoo.adapter("llama"), "source": zoo.model("llama"), "target": zoo.model("qwen2")}


def assert_one_error_line(code: int, out: str, err: str, want_code: int = 2) -> str:
    assert code == want_code, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert len(lines[0]) > len("error: ") + 10
    return lines[0]


def expect_error(capsys, inputs: dict[str, Path], out: Path, *extra: str, match: str | None = None, code: int = 2, mid_run: bool = False) -> str:
    rc, stdout, stderr = run_cli(transfer_args(inputs, out, *extra), capsys)
    line = assert_one_error_line(rc, stdout, stderr, code)
    if match is not None:
        assert re.search(match, line, re.IGNORECASE), line
    assert not out.exists() or not any(out.iterdir()), f"something was left under {out}"
    if not mid_run:
        # refused while checking the inputs: not even the hidden resume state was started
        assert not state_dir_for(out).exists()
    return line


def with_(good: dict[str, Path], **changes: Path) -> dict[str, Path]:
    return {**good, **changes}


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# ---- missing and unreadable ----------------------------------------------------------------------


@pytest.mark.parametrize("role", ["adapter", "source", "target"])
def test_missing_folder(capsys, good, tmp_path, role):
    missing = tmp_path / f"no-such-{role}"
    line = expect_error(capsys, with_(good, **{role: missing}), tmp_path / "out", match="no such file or directory|not found")
    assert str(missing) in line


def test_input_is_a_file_not_a_folder(capsys, good, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    expect_error(capsys, with_(good, source=f), tmp_path / "out", match="folder")


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_file_missing(capsys, good, tmp_path, name):
    ad = copy(good["adapter"], tmp_path / "ad")
    (ad / name).unlink()
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match=re.escape(name))


def test_model_weights_missing(capsys, good, tmp_path):
    src = copy(good["source"], tmp_path / "src")
    (src / "model.safetensors").unlink()
    expect_error(capsys, with_(good, source=src), tmp_path / "out", match="safetensors")


def test_shard_named_in_index_missing(capsys, zoo, good, tmp_path):
    src = copy(zoo.model("llama", sharded=True), tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(capsys, with_(good, source=src), tmp_path / "out", match=re.escape(shard.name))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_permissions(capsys, good, tmp_path):
    ad = copy(good["adapter"], tmp_path / "ad")
    (ad / "adapter_model.safetensors").chmod(0)
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="cannot read|permission")


@pytest.mark.parametrize("which", ["adapter_model.safetensors", "adapter_config.json"])
def test_unreadable_adapter_file_is_a_directory(capsys, good, tmp_path, which):
    ad = copy(good["adapter"], tmp_path / "ad")
    (ad / which).unlink()
    (ad / which).mkdir()
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="cannot read|not valid|directory")


def test_unreadable_model_config_is_a_directory(capsys, good, tmp_path):
    tgt = copy(good["target"], tmp_path / "tgt")
    (tgt / "config.json").unlink()
    (tgt / "config.json").mkdir()
    expect_error(capsys, with_(good, target=tgt), tmp_path / "out", match="config.json")


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]"])
def test_config_not_json(capsys, good, tmp_path, payload):
    src = copy(good["source"], tmp_path / "src")
    (src / "config.json").write_bytes(payload)
    expect_error(capsys, with_(good, source=src), tmp_path / "out", match="config.json")


# ---- truncated and corrupt safetensors ------------------------------------------------------------


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_adapter(capsys, good, tmp_path):
    ad = copy(good["adapter"], tmp_path / "ad")
    cut_in_half(ad / "adapter_model.safetensors")
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="truncated")


def test_truncated_single_file_model(capsys, good, tmp_path):
    tgt = copy(good["target"], tmp_path / "tgt")
    cut_in_half(tgt / "model.safetensors")
    expect_error(capsys, with_(good, target=tgt), tmp_path / "out", match="truncated")


def test_truncated_shard(capsys, zoo, good, tmp_path):
    src = copy(zoo.model("llama", sharded=True), tmp_path / "src")
    shard = max(src.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
    cut_in_half(shard)
    expect_error(capsys, with_(good, source=src), tmp_path / "out", match="truncated")


def test_file_shorter_than_a_header(capsys, good, tmp_path):
    ad = copy(good["adapter"], tmp_path / "ad")
    (ad / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="truncated|header")


@pytest.mark.parametrize("how", ["garbage", "huge-length", "bad-offsets", "not-a-dict"])
def test_corrupt_header(capsys, good, tmp_path, how):
    ad = copy(good["adapter"], tmp_path / "ad")
    f = ad / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if how == "garbage":
        data[8:40] = b"\xff" * 32
    elif how == "huge-length":
        data[:8] = (10**15).to_bytes(8, "little")
    elif how == "bad-offsets":
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = [b, e + 4]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (n - len(raw)) if len(raw) <= n else b""
        assert len(raw) == n
        data[8 : 8 + n] = raw
    else:
        raw = b"[]" + b" " * (n - 2)
        data[8 : 8 + n] = raw
    f.write_bytes(bytes(data))
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="corrupt|not a valid|truncated")


def test_corrupt_model_header(capsys, good, tmp_path):
    src = copy(good["source"], tmp_path / "src")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[9:30] = b"#" * 21
    f.write_bytes(bytes(data))
    expect_error(capsys, with_(good, source=src), tmp_path / "out", match="corrupt|not a valid")


# ---- adapters that do not fit or cannot be transferred ---------------------------------------------


def test_adapter_for_another_model(capsys, zoo, good, tmp_path):
    # a qwen2 adapter offered with a llama source: same module names, other shapes
    line = expect_error(capsys, with_(good, adapter=zoo.adapter("qwen2")), tmp_path / "out", match="do not fit|source model")
    assert "source" in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_adapter(capsys, good, tmp_path, bad):
    ad = copy(good["adapter"], tmp_path / "ad")
    f = ad / "adapter_model.safetensors"
    t = load_file(str(f))
    name = sorted(n for n in t if "layers.1.mlp.up_proj.lora_B" in n)[0]
    t[name][3, 2] = bad
    save_file(t, str(f), metadata={"format": "pt"})
    line = expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="NaN or Inf")
    assert "layers.1.mlp.up_proj" in line


@pytest.mark.parametrize("role", ["source", "target"])
def test_nan_in_a_base_weight(capsys, good, tmp_path, role):
    model = copy(good[role], tmp_path / role)
    f = model / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.1.mlp.down_proj.weight"
    t[name][5, 7] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    line = expect_error(capsys, with_(good, **{role: model}), tmp_path / "out", match="NaN or Inf", mid_run=True)
    assert name in line and role in line


def test_ia3_adapter(capsys, zoo, good, tmp_path):
    ad = zoo.adapter("llama", "ia3", kind="ia3")
    assert json.loads((ad / "adapter_config.json").read_text())["peft_type"] == "IA3"
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="IA3.*only LoRA")


@pytest.mark.parametrize("peft_type", ["LOHA", "PREFIX_TUNING", "ADALORA"])
def test_other_peft_types(capsys, good, tmp_path, peft_type):
    ad = copy(good["adapter"], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match=peft_type)


def test_dora_adapter(capsys, zoo, good, tmp_path):
    ad = zoo.adapter("llama", "dora", use_dora=True)
    assert any("lora_magnitude_vector" in n for n in read_tensors(ad / "adapter_model.safetensors"))
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="DoRA")


def test_dora_magnitudes_without_the_flag(capsys, zoo, good, tmp_path):
    ad = copy(zoo.adapter("llama", "dora", use_dora=True), tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="DoRA")


def test_adapter_with_no_lora_factors(capsys, good, tmp_path):
    ad = copy(good["adapter"], tmp_path / "ad")
    save_file({"base_model.model.lm_head.weight": torch.zeros(4, 4)}, str(ad / "adapter_model.safetensors"))
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="no LoRA factors|none of its LoRA modules")


def test_adapter_rank_disagrees_with_config(capsys, good, tmp_path):
    ad = copy(good["adapter"], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 4
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="rank")


# ---- models ---------------------------------------------------------------------------------------


def test_unknown_architecture_lists_supported(capsys, good, tmp_path):
    tgt = copy(good["target"], tmp_path / "tgt")
    cfg = json.loads((tgt / "config.json").read_text())
    cfg["model_type"] = "foo"
    (tgt / "config.json").write_text(json.dumps(cfg))
    line = expect_error(capsys, with_(good, target=tgt), tmp_path / "out", match="foo")
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
        assert re.search(rf"\b{family}\b", line), (family, line)


def test_config_without_dimensions(capsys, good, tmp_path):
    src = copy(good["source"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, with_(good, source=src), tmp_path / "out", match="hidden_size")


def test_pickled_model_is_refused_without_unpickling(capsys, good, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(good["source"] / "config.json", src / "config.json")
    marker = tmp_path / "UNPICKLED"
    write_pickle_bomb(src / "pytorch_model.bin", marker)
    # the bomb works: loading it the unsafe way would create the marker
    pickle.loads((src / "pytorch_model.bin").read_bytes())
    assert marker.exists()
    marker.unlink()
    expect_error(capsys, with_(good, source=src), tmp_path / "out", match="pickle")
    assert not marker.exists()


def test_pickled_adapter_is_refused_without_unpickling(capsys, good, tmp_path):
    ad = copy(good["adapter"], tmp_path / "ad")
    (ad / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    write_pickle_bomb(ad / "adapter_model.bin", marker)
    expect_error(capsys, with_(good, adapter=ad), tmp_path / "out", match="pickle")
    assert not marker.exists()


def test_target_weight_shape_disagrees_with_config(capsys, good, tmp_path):
    tgt = copy(good["target"], tmp_path / "tgt")
    cfg = json.loads((tgt / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (tgt / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, with_(good, target=tgt), tmp_path / "out", match="shape")


# ---- the output folder ----------------------------------------------------------------------------


def test_output_not_empty_then_force(capsys, good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, stdout, stderr = run_cli(transfer_args(good, out), capsys)
    line = assert_one_error_line(rc, stdout, stderr)
    assert "not empty" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    rc, stdout, stderr = run_cli(transfer_args(good, out, "--force"), capsys)
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "crosslora_report.json"]
    # and no leftovers beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_is_a_file(capsys, good, tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    rc, stdout, stderr = run_cli(transfer_args(good, out), capsys)
    assert_one_error_line(rc, stdout, stderr)
    assert out.read_text() == "x"


@pytest.mark.parametrize("role", ["adapter", "source", "target"])
def test_output_inside_an_input(capsys, good, tmp_path, role):
    inputs = {k: copy(v, tmp_path / k) for k, v in good.items()}
    before = sorted(p.name for p in inputs[role].iterdir())
    out = inputs[role] / "sub" / "out"
    expect_error(capsys, inputs, out, match="inside")
    assert sorted(p.name for p in inputs[role].iterdir()) == before


def test_output_containing_the_inputs_is_refused_even_with_force(capsys, good, tmp_path):
    inputs = {k: copy(v, tmp_path / "work" / k) for k, v in good.items()}
    out = tmp_path / "work"
    rc, stdout, stderr = run_cli(transfer_args(inputs, out, "--force"), capsys)
    line = assert_one_error_line(rc, stdout, stderr)
    assert "inside" in line
    for p in inputs.values():
        assert p.exists() and any(p.iterdir())


# ---- usage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,match",
    [(["--rank", "0"], "rank"), (["--device", "tpu"], "device"), (["--max-memory", "lots"], "size|max-memory")],
)
def test_bad_options(capsys, good, tmp_path, extra, match):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(transfer_args(good, out, *extra), capsys)
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    assert re.search(match, stderr, re.IGNORECASE), stderr
    assert not out.exists()


# ---- the budget -----------------------------------------------------------------------------------


def test_budget_too_small_exits_3_naming_the_smallest_budget(capsys, good, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(transfer_args(good, out, "--max-memory", "1MB"), capsys)
    line = assert_one_error_line(rc, stdout, stderr, want_code=3)
    m = re.search(r"smallest budget that works is (?:about )?([0-9.]+ ?[KMG]i?B)", line)
    assert m, line
    from lowmem_crosslora.sizes import parse_size

    named = parse_size(m.group(1).replace(" ", ""))
    assert named > 1_000_000
    assert not out.exists()
    # and the budget it names does work (the figure includes headroom for the allocator's creep)
    rc, stdout, stderr = run_cli(transfer_args(good, out, "--max-memory", str(named)), capsys)
    assert rc == 0, stderr
    assert (out / "adapter_model.safetensors").exists()


# ---- the same through a real process ---------------------------------------------------------------


def test_real_process_bad_input(good, tmp_path):
    ad = copy(good["adapter"], tmp_path / "ad")
    cut_in_half(ad / "adapter_model.safetensors")
    out = tmp_path / "out"
    rc, stdout, stderr = run_module(transfer_args(with_(good, adapter=ad), out))
    line = assert_one_error_line(rc, stdout, stderr)
    assert "truncated" in line
    assert not out.exists()


def test_real_process_pickled_model(good, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(good["source"] / "config.json", src / "config.json")
    marker = tmp_path / "UNPICKLED"
    write_pickle_bomb(src / "pytorch_model.bin", marker)
    out = tmp_path / "out"
    # without --quiet too: still exactly one line on stderr
    args = [a for a in transfer_args(with_(good, source=src), out) if a != "--quiet"]
    rc, stdout, stderr = run_module(args)
    line = assert_one_error_line(rc, stdout, stderr)
    assert "pickle" in line
    assert not marker.exists() and not out.exists()
