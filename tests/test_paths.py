"""Odd output and report paths (issue 17, classes 3, 4, 7 and 11): every output path is checked before
any work, and a refusal is one line, exit 2, the inputs untouched and nothing left behind: a --report
that would overwrite an input or cannot be written, an --out that is a symlink loop, a dangling or
live symbolic link, the empty string or the working directory, an empty --adapter, a batch with one
bad adapter, and click's own usage errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_tree, refused, run_module, transfer_args


@pytest.fixture(scope="module")
def good(zoo: Any) -> dict[str, Path]:
    return {"adapter": zoo.adapter("llama"), "source": zoo.model("llama"), "target": zoo.model("qwen2")}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.mark.parametrize("where", ["adapter_config", "adapter_weights", "inside_source", "a_folder", "no_folder"])
def test_a_report_path_is_checked_before_any_work(good: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    report = {
        "adapter_config": good["adapter"] / "adapter_config.json",
        "adapter_weights": good["adapter"] / "adapter_model.safetensors",
        "inside_source": good["source"] / "report.json",
        "a_folder": work,
        "no_folder": work / "missing" / "report.json",
    }[where]
    out = work / "out"
    line = refused([*transfer_args(good, out), "--report", str(report)], capsys, [good["adapter"], good["source"]], out)
    assert "--report" in line
    assert not (good["source"] / "report.json").exists()


def test_a_symlink_loop_as_out_is_one_line(good: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "a").symlink_to(work / "b")
    (work / "b").symlink_to(work / "a")
    line = refused(transfer_args(good, work / "a" / "out"), capsys, [good["adapter"]], work / "a" / "out")
    assert "symbolic link loop" in line or "cannot be resolved" in line


@pytest.mark.parametrize("kind", ["dangling", "live"])
def test_a_symbolic_link_as_out_is_refused(good: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    target = work / ("nowhere" if kind == "dangling" else "real")
    if kind == "live":
        target.mkdir()
    (work / "out").symlink_to(target)
    code_line = refused([*transfer_args(good, work / "out"), "--force"], capsys, [good["adapter"]], work / "elsewhere")
    assert "symbolic link" in code_line
    assert (work / "out").is_symlink() and sorted(p.name for p in work.iterdir()) == sorted(["out", *(["real"] if kind == "live" else [])])


@pytest.mark.parametrize("option", ["--out", "--adapter", "--source"])
def test_an_empty_path_is_refused(good: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    args = transfer_args(good, work / "out")
    args[args.index(option) + 1] = ""
    line = refused(args, capsys, [good["adapter"]], work / "out")
    assert "empty path" in line and option in line


def test_the_working_directory_is_never_an_output(good: dict[str, Path], work: Path) -> None:
    (work / "keep.txt").write_text("mine")
    code, _out, err = run_module([*transfer_args(good, Path(".")), "--force"], cwd=work)
    assert code == 2 and "working directory" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


def test_a_batch_with_one_bad_adapter_leaves_no_output_folder(good: dict[str, Path], work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = copy_tree(good["adapter"], tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    out = work / "batch"
    args = transfer_args(good, out)
    args[args.index("--adapter") + 1 : args.index("--adapter") + 1] = [str(good["adapter"]), "--adapter"]
    args[args.index("--adapter", args.index("--adapter") + 1) + 1] = str(bad)
    refused(args, capsys, [bad], out)
    assert not out.exists()


def test_a_usage_error_is_one_line(good: dict[str, Path], work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [a for a in transfer_args(good, work / "out") if a not in ("--out", str(work / "out"))]
    line = refused(args, capsys, [good["adapter"]], work / "out")
    assert "--out" in line and "--help" in line
    assert os.listdir(work) == []


def test_demo_keep_never_replaces_what_it_did_not_write(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = work / "mine"
    (mine / "source-llama").mkdir(parents=True)
    (mine / "source-llama" / "notes.txt").write_text("the user's")
    line = refused(["demo", "--keep", str(mine), "-q"], capsys, [mine], work / "nothing")
    assert "not empty" in line and "--force" in line
    (work / "afile").write_text("x")
    assert "not a folder" in refused(["demo", "--keep", str(work / "afile"), "-q"], capsys, [work / "afile"], work / "nothing")


def test_messages_point_the_right_way(good: dict[str, Path], work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A symlink loop as --adapter is a path, not a hub id; a pickled adapter's line names the commands
    that read it; torch's advice on loading unsafely is never relayed."""
    (work / "org").mkdir()
    (work / "org" / "name").symlink_to(work / "org" / "name2")
    (work / "org" / "name2").symlink_to(work / "org" / "name")
    out = work / "out"
    args = transfer_args({**good, "adapter": work / "org" / "name"}, out)
    line = refused(args, capsys, [good["source"]], out)
    assert "Hugging Face cache" not in line and "symbolic link" in line
    pickled = copy_tree(good["adapter"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    line = refused(["inspect", str(pickled)], capsys, [pickled], out)
    assert "`transfer` and `plan`" in line
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04\x95not a pickle of tensors")
    line = refused([*transfer_args({**good, "adapter": pickled}, out), "--allow-pickle"], capsys, [pickled], out)
    assert "refused" in line and "weights_only=False" not in line and "trust" not in line
