"""Hub ids (org/name) resolve from the local Hugging Face cache, with no network, or fail in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, transfer_args

from lowmem_crosslora.io.hub import hub_cache_dir, resolve

HF_VARS = ("HF_HUB_CACHE", "HF_HOME", "HUGGINGFACE_HUB_CACHE")


def cache_copy(src: Path, hub: Path, repo_id: str, revision: str = "0123abcd", ref: bool = True) -> Path:
    """Lay a folder out as huggingface_hub does: blobs, snapshots/<rev>/ of symlinks, refs/main."""
    org, name = repo_id.split("/")
    repo = hub / f"models--{org}--{name}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / f"{revision}-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for v in HF_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # no relative folder named like the ids
    return tmp_path


def test_source_target_and_adapter_as_hub_ids(zoo: Any, clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hub = clean_env / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    cache_copy(zoo.model("phi3"), hub, "acme/tiny-phi3")
    cache_copy(zoo.model("qwen2"), hub, "acme/tiny-qwen2")
    cache_copy(zoo.adapter("phi3"), hub, "acme/phi3-lora")
    out = clean_env / "out"
    inputs = {"adapter": Path("acme/phi3-lora"), "source": Path("acme/tiny-phi3"), "target": Path("acme/tiny-qwen2")}
    code, _, err = run_cli(transfer_args(inputs, out), capsys)
    assert code == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "acme/tiny-qwen2"


def test_hf_home_and_default_locations(zoo: Any, clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = clean_env / "hfhome"
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub_cache_dir() == home / "hub"
    snap = cache_copy(zoo.model("gpt2"), home / "hub", "acme/tiny-gpt2")
    assert resolve("acme/tiny-gpt2", "source") == snap
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(clean_env / "user"))
    assert hub_cache_dir() == clean_env / "user" / ".cache" / "huggingface" / "hub"
    snap = cache_copy(zoo.model("gpt2"), hub_cache_dir(), "acme/tiny-gpt2", revision="feed", ref=False)
    assert resolve("acme/tiny-gpt2", "source") == snap  # one snapshot and no refs/main: that one
    monkeypatch.setenv("HF_HUB_CACHE", str(clean_env / "elsewhere"))
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub_cache_dir() == clean_env / "elsewhere"  # HF_HUB_CACHE wins


def test_missing_hub_id_is_one_clear_line(zoo: Any, clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hub = clean_env / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    inputs = {"adapter": zoo.adapter("llama"), "source": Path("meta-llama/Llama-3.2-1B"), "target": zoo.model("qwen2")}
    code, _, err = run_cli(transfer_args(inputs, clean_env / "out"), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "meta-llama/Llama-3.2-1B" in err and str(hub / "models--meta-llama--Llama-3.2-1B" / "snapshots") in err and "network" in err
    # a refs/main naming a revision whose folder is gone says so
    cache_copy(zoo.model("qwen2"), hub, "acme/broken")
    shutil.rmtree(hub / "models--acme--broken" / "snapshots" / "0123abcd")
    inputs["source"] = Path("acme/broken")
    code, _, err = run_cli(transfer_args(inputs, clean_env / "out"), capsys)
    assert code == 2 and "refs/main names 0123abcd" in err and len(err.strip().splitlines()) == 1


def test_paths_that_exist_are_never_looked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve("org/name", "source") == Path("org/name")
    assert resolve("./x/y", "source") == Path("./x/y")  # not an id: left as it is
