"""The basis cache (issue 5): hits, byte identity, verification, limits, commands, precompute, resume.

Small synthetic models (4 layers x 7 modules), rank 16, on the CPU, each test with a cache folder of
its own. Most transfers run in this process (the bytes are compared between runs of one process, so
with one thread setting); the resume tests run the CLI in subprocesses and kill it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from bench.crash import build_pair, run_child, transfer_command
from lowmem_crosslora import transfer
from lowmem_crosslora.services.cache import BasisCache, CacheKey, default_cache_dir
from lowmem_crosslora.services.factoring import CacheWarning

RANK = 16
UNITS = 28
MATRICES = 56  # every unit's source and target weight are distinct (layer map 'index')


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pair(tmp_path_factory.mktemp("cache-models"))  # the crash tests' pair (bench/crash.py)


def run(models: Path, out: Path, cache: Path | None, **kw) -> tuple[dict, bytes, list[str]]:
    msgs: list[str] = []
    kw.setdefault("rank", RANK)
    report = transfer(models / "adapter", models / "source", models / "target", out, device="cpu", cache_dir=cache, warn=msgs.append, **kw)
    return report, (out / "adapter_model.safetensors").read_bytes(), msgs


@pytest.fixture(scope="module")
def reference(models: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "out"
    _, data, _ = run(models, out, None, use_cache=False)
    return data


def methods(report: dict) -> set[str]:
    return {u["method"][side] for u in report["units"] for side in ("source", "target")}


def entry_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))


# ---- hits and byte identity ------------------------------------------------------------------


def test_second_transfer_hits_cache_and_is_byte_identical(models: Path, reference: bytes, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    rep1, data1, msgs1 = run(models, tmp_path / "a", cache)
    assert data1 == reference
    assert rep1["summary"]["cache"]["stored"] == MATRICES and rep1["summary"]["cache"]["hits"] == 0
    assert not any(m.startswith("cached:") for m in methods(rep1))
    assert len(entry_files(cache)) == MATRICES
    rep2, data2, msgs2 = run(models, tmp_path / "b", cache)
    assert data2 == reference
    assert msgs1 == msgs2 == []
    c = rep2["summary"]["cache"]
    assert c["hits"] == MATRICES and c["stored"] == 0 and c["rejected"] == 0
    assert all(m.startswith("cached:") for m in methods(rep2)), methods(rep2)
    assert {u["mode"]["source"] for u in rep2["units"]} == {"cached"}
    assert rep2["summary"]["phase_seconds"]["svd"] == 0.0
    # Both kinds of entry were exercised: exact (k, v: 32 x 64) and randomized (the rest).
    assert methods(rep2) == {"cached:exact", "cached:randomized"}


def test_no_cache_writes_nothing(models: Path, reference: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    default = default_cache_dir()  # the per-test folder conftest points the default at
    assert not any(default.iterdir())
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["transfer", "--adapter", str(models / "adapter"), "--source", str(models / "source"), "--target", str(models / "target")]
        + ["--out", str(out), "--device", "cpu", "--rank", str(RANK), "--quiet", "--no-cache"],
        capsys,
    )
    assert code == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() == reference
    assert not any(default.iterdir())
    assert json.loads((out / "crosslora_report.json").read_text())["summary"]["cache"] is None
    # Without --no-cache the default folder is used.
    code, _, err = run_cli(
        ["transfer", "--adapter", str(models / "adapter"), "--source", str(models / "source"), "--target", str(models / "target")]
        + ["--out", str(tmp_path / "out2"), "--device", "cpu", "--rank", str(RANK), "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert len(entry_files(default)) == MATRICES


def test_other_settings_miss_where_bytes_would_differ(models: Path, reference: bytes, tmp_path: Path) -> None:
    """A new --seed changes every randomized basis but no exact one: only the exact entries hit."""
    cache = tmp_path / "cache"
    run(models, tmp_path / "a", cache)
    rep_ref, ref_seed1, _ = run(models, tmp_path / "ref1", None, seed=1, use_cache=False)
    rep, data, _ = run(models, tmp_path / "b", cache, seed=1)
    assert data == ref_seed1
    assert methods(rep) == {"cached:exact", "randomized"}
    exact = sum(1 for u in rep["units"] for side in ("source", "target") if u["method"][side] == "cached:exact")
    assert rep["summary"]["cache"]["hits"] == exact > 0


# ---- verification ----------------------------------------------------------------------------


def test_corrupt_entries_are_detected_and_recomputed(models: Path, reference: bytes, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run(models, tmp_path / "a", cache)
    files = entry_files(cache)
    flipped, truncated, header, swapped = files[0], files[1], files[2], files[3]
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0xFF  # one byte of V
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    raw = bytearray(header.read_bytes())
    raw[20] ^= 0x55  # inside the JSON header
    header.write_bytes(bytes(raw))
    swapped.write_bytes(files[4].read_bytes())  # a valid entry under another key's name
    rep, data, msgs = run(models, tmp_path / "b", cache)
    assert data == reference
    c = rep["summary"]["cache"]
    assert c["rejected"] == 4 and c["stored"] == 4 and c["hits"] == MATRICES - 4
    assert len(msgs) == 4 and all("failed verification" in m for m in msgs), msgs
    assert any("checksum" in m for m in msgs) and any("key mismatch" in m for m in msgs)
    # Replaced by good entries: a third run reads everything.
    rep3, data3, msgs3 = run(models, tmp_path / "c", cache)
    assert data3 == reference and msgs3 == [] and rep3["summary"]["cache"]["hits"] == MATRICES


def test_api_warns_with_cache_warning(models: Path, reference: bytes, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(CacheWarning, match="cannot write"):
        transfer(models / "adapter", models / "source", models / "target", tmp_path / "out", device="cpu", rank=RANK, cache_dir=blocker / "cache")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == reference


def test_unwritable_cache_dir_warns_and_succeeds(models: Path, reference: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # a folder below a file cannot be created, even by root
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["transfer", "--adapter", str(models / "adapter"), "--source", str(models / "source"), "--target", str(models / "target")]
        + ["--out", str(out), "--device", "cpu", "--rank", str(RANK), "--quiet", "--cache-dir", str(blocker / "cache")],
        capsys,
    )
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: basis cache: cannot write to"), err
    assert "continuing without storing bases" in lines[0]
    assert (out / "adapter_model.safetensors").read_bytes() == reference


# ---- limits and commands ---------------------------------------------------------------------


def test_size_limit_evicts_least_recently_used_after_writes(models: Path, reference: bytes, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    limit = 100_000
    rep, data, _ = run(models, tmp_path / "a", cache, cache_limit=limit)
    assert data == reference
    total = sum(p.stat().st_size for p in entry_files(cache))
    assert total <= limit
    assert rep["summary"]["cache"]["evicted"] > 0
    # What is left is what was written last: the last units' target weights are there.
    names = {BasisCache(cache).describe(e)["tensor"] for e in BasisCache(cache).entries()}
    assert "model.layers.3.mlp.down_proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names


def test_cache_ls_prune_clear(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    code, out, err = run_cli(["bases", str(models / "source"), "--rank", str(RANK), "--device", "cpu", "--cache-dir", str(cache), "--quiet"], capsys)
    assert code == 0, err
    files = entry_files(cache)
    assert len(files) == UNITS
    # Known last-used times: file i was used at t0 + i.
    order = sorted(files)
    for i, p in enumerate(order):
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
    code, out, err = run_cli(["cache", "ls", "--cache-dir", str(cache), "--json"], capsys)
    assert code == 0, err
    listing = json.loads(out)
    assert len(listing["entries"]) == UNITS
    assert listing["total_bytes"] == sum(p.stat().st_size for p in files)
    assert [e["file"] for e in listing["entries"]] == [p.name for p in order]  # least recently used first
    e0 = listing["entries"][0]
    assert e0["tensor"].startswith("model.layers.") and e0["r"] == RANK and len(e0["shape"]) == 2 and e0["size"] > 0
    code, out, err = run_cli(["cache", "ls", "--cache-dir", str(cache)], capsys)
    assert code == 0 and f"{UNITS} entries" in out and "model.layers.0.self_attn.q_proj.weight" in out
    # Keep the 10 most recently used: exactly their total size.
    keep = order[-10:]
    limit = sum(p.stat().st_size for p in keep)
    code, out, err = run_cli(["cache", "prune", "--cache-dir", str(cache), "--max-size", str(limit)], capsys)
    assert code == 0, err
    assert "removed 18 entries" in out
    assert entry_files(cache) == sorted(keep)
    code, out, err = run_cli(["cache", "prune", "--cache-dir", str(cache), "--max-size", str(limit)], capsys)
    assert "removed 0 entries" in out
    code, out, err = run_cli(["cache", "clear", "--cache-dir", str(cache)], capsys)
    assert code == 0 and "removed 10 entries" in out
    assert entry_files(cache) == []
    code, out, err = run_cli(["cache", "ls", "--cache-dir", str(cache)], capsys)
    assert code == 0 and "0 entries" in out


def test_default_location_per_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOWMEM_CROSSLORA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lowmem-crosslora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "lowmem-crosslora"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_cache_dir() == Path.home() / "Library" / "Caches" / "lowmem-crosslora"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert default_cache_dir() == tmp_path / "local" / "lowmem-crosslora" / "Cache"


# ---- precompute ------------------------------------------------------------------------------


def test_bases_then_transfer_only_projects(models: Path, reference: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    for model in ("source", "target"):
        code, out, err = run_cli(["bases", str(models / model), "--rank", str(RANK), "--device", "cpu", "--cache-dir", str(cache)], capsys)
        assert code == 0, err
        assert "28 matrices" in out and "28 stored" in out
    rep, data, msgs = run(models, tmp_path / "out", cache)
    assert data == reference and msgs == []
    c = rep["summary"]["cache"]
    assert c["hits"] == MATRICES and c["stored"] == 0
    assert rep["summary"]["phase_seconds"]["svd"] == 0.0
    # Again: everything is already there.
    code, out, err = run_cli(["bases", str(models / "source"), "--rank", str(RANK), "--device", "cpu", "--cache-dir", str(cache), "--json"], capsys)
    assert code == 0 and json.loads(out)["cache"]["hits"] == UNITS


def test_exact_entries_serve_smaller_ranks_by_truncation(models: Path, tmp_path: Path) -> None:
    """Precomputed at rank 24, a rank-16 transfer reuses the exact entries (byte-identically) and
    recomputes the randomized ones, whose rank-24 basis is not the rank-16 one bit for bit."""
    cache = tmp_path / "cache"
    from lowmem_crosslora.commands.bases import precompute_bases

    precompute_bases(models / "source", 24, device="cpu", cache_dir=cache)
    _, ref, _ = run(models, tmp_path / "ref", None, use_cache=False)
    rep, data, _ = run(models, tmp_path / "out", cache)
    assert data == ref
    src = {u["method"]["source"] for u in rep["units"]}
    assert src == {"cached:exact", "randomized"}


def test_cache_key_fields() -> None:
    base = CacheKey("ab" * 32, "BF16", (64, 32), "exact", "float32")
    assert base.digest() == CacheKey("ab" * 32, "BF16", (64, 32), "exact", "float32", r=5, seed=9).digest()  # exact: r-free
    rnd = CacheKey("ab" * 32, "BF16", (64, 32), "randomized", "float32", 16, 26, 2, 123, "cpu")
    for other in (
        CacheKey("ab" * 32, "BF16", (64, 32), "randomized", "float32", 17, 26, 2, 123, "cpu"),
        CacheKey("ab" * 32, "BF16", (64, 32), "randomized", "float32", 16, 27, 2, 123, "cpu"),
        CacheKey("ab" * 32, "BF16", (64, 32), "randomized", "float32", 16, 26, 1, 123, "cpu"),
        CacheKey("ab" * 32, "BF16", (64, 32), "randomized", "float32", 16, 26, 2, 124, "cpu"),
        CacheKey("ab" * 32, "BF16", (64, 32), "randomized", "float32", 16, 26, 2, 123, "cuda"),
        CacheKey("ab" * 32, "BF16", (64, 32), "randomized", "float64", 16, 26, 2, 123, "cpu"),
        CacheKey("cd" * 32, "BF16", (64, 32), "randomized", "float32", 16, 26, 2, 123, "cpu"),
        CacheKey("ab" * 32, "F16", (64, 32), "randomized", "float32", 16, 26, 2, 123, "cpu"),
    ):
        assert other.digest() != rnd.digest()


# ---- resume ----------------------------------------------------------------------------------


def _cli(models: Path, out: Path, cache: Path) -> list[str]:
    return transfer_command(models, out, "--cache-dir", str(cache), rank=RANK)


@pytest.mark.parametrize("kill", ["after_unit:3", "mid_write:4"])
def test_resume_recomputes_nothing_cached(models: Path, tmp_path: Path, kill: str) -> None:
    """Units 0..3 are journaled in both cases; mid_write:4 also factored unit 4's two weights.
    A basis is written to the cache on a thread of its own while the next matrix is factored, and a
    write waits for the one before, so the kill may catch the last write in flight: every earlier
    basis is in the cache, the last one may be."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    p = run_child(_cli(models, out, cache), kill=kill)
    assert p.returncode == -signal.SIGKILL, p.stderr
    before = {f.name: f.stat().st_ino for f in entry_files(cache)}
    done = 4
    factored = 2 * done + (2 if kill.startswith("mid_write") else 0)
    assert len(before) in (factored - 1, factored), len(before)
    hits = max(0, len(before) - 2 * done)  # the entries of unit 4, which the resume needs
    p = run_child(_cli(models, out, cache))
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "crosslora_report.json").read_text())
    c = report["summary"]["cache"]
    assert report["summary"]["resumed_units"] == done
    assert c["hits"] == hits and c["stored"] == 2 * (UNITS - done) - hits, c
    after = {f.name: f.stat().st_ino for f in entry_files(cache)}
    assert len(after) == len(before) + c["stored"]
    assert all(after[name] == ino for name, ino in before.items())  # no entry of the killed run was rewritten
    if kill.startswith("mid_write"):  # unit 4 (0.gate) was factored, not journaled: redone from the cache
        assert hits >= 1
        unit4 = next(u for u in report["units"] if u["uid"] == "0.gate")
        assert unit4["method"]["source"].startswith("cached:")
        assert unit4["method"]["target"].startswith("cached:") == (hits == 2)
    # The result equals an uninterrupted run's with the same thread settings.
    ref = tmp_path / "ref"
    p = run_child([*_cli(models, ref, tmp_path / "c2"), "--no-cache"])
    assert p.returncode == 0, p.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()


def test_entries_that_do_not_fit_the_budget_are_computed(models: Path, reference: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading an entry is planned inside --max-memory: when the planner says it does not fit, the
    basis is computed instead (and a write that does not fit beside the next matrix is done at once)."""
    from lowmem_crosslora.services.memory import Budget

    cache = tmp_path / "cache"
    run(models, tmp_path / "a", cache)
    asked: list[int] = []

    def no_room(self: Budget, nbytes: int, retained: int = 0) -> bool:
        asked.append(nbytes)
        return False

    monkeypatch.setattr(Budget, "fits_host", no_room)
    rep, data, msgs = run(models, tmp_path / "b", cache)
    assert data == reference and msgs == []
    c = rep["summary"]["cache"]
    assert c["hits"] == 0 and c["stored"] == MATRICES
    assert not any(m.startswith("cached:") for m in methods(rep))
    # Each lookup asked for at least the basis it would hold: 4 (m + n + 1) r bytes.
    assert len(asked) >= MATRICES and min(asked) >= 4 * (32 + 64 + 1) * RANK


def test_hashing_ahead_on_a_thread_gives_the_same_keys_and_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an accelerator the next weights are hashed ahead on a thread; the keys and the output must
    be those of hashing inline (forced here on the CPU by making the engine think it is elsewhere)."""
    import lowmem_crosslora.services.factoring as engine_mod
    from lowmem_crosslora import transfer as run
    from lowmem_crosslora.services.synthetic import DEMO_SOURCE, DEMO_TARGET, write_adapter, write_model

    s = write_model(tmp_path / "s", DEMO_SOURCE, dtype="float32")
    t = write_model(tmp_path / "t", DEMO_TARGET, dtype="float32", seed=1)
    a = write_adapter(tmp_path / "a", DEMO_SOURCE)
    real = engine_mod.Engine.prehash
    calls = {"n": 0}

    def ahead(self, jobs):  # noqa: ANN001, ANN202
        device, self.device = self.device, "accelerator"
        try:
            real(self, jobs)
            calls["n"] += len(self._hash_futs)
        finally:
            self.device = device

    monkeypatch.setattr(engine_mod.Engine, "prehash", ahead)
    run(a, s, t, tmp_path / "o1", rank=16, device="cpu", cache_dir=str(tmp_path / "c1"))
    monkeypatch.undo()
    assert calls["n"] > 0
    run(a, s, t, tmp_path / "o2", rank=16, device="cpu", cache_dir=str(tmp_path / "c2"))
    assert (tmp_path / "o1" / "adapter_model.safetensors").read_bytes() == (tmp_path / "o2" / "adapter_model.safetensors").read_bytes()
    keys = [sorted(p.name for p in (tmp_path / c).rglob("*") if p.is_file()) for c in ("c1", "c2")]
    assert keys[0] == keys[1] and keys[0]


# ---- the hash memo: a warm run does not read the weights to find their entries -------------------


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import lowmem_crosslora.io.hashing as cache_mod

    calls: list[int] = []
    real = cache_mod.content_hash

    def counting(path, offset, length, chunk=16 << 20):
        calls.append(length)
        return real(path, offset, length, chunk)

    monkeypatch.setattr(cache_mod, "content_hash", counting)
    return calls


def test_warm_run_hashes_nothing_and_a_changed_file_is_hashed_again(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "models"
    shutil.copytree(models, src)
    calls = count_hashing(monkeypatch)
    cache = tmp_path / "cache"
    run(src, tmp_path / "a", cache)
    assert len(calls) == MATRICES
    assert sorted(p.suffix for p in (cache / "hashes").iterdir()) == [".json", ".json"]  # one memo per weight file
    calls.clear()
    rep, _, _ = run(src, tmp_path / "b", cache)
    assert calls == [] and rep["summary"]["cache"]["hits"] == MATRICES

    # Rewrite the target's weights with one tensor changed, then put the old modification time back:
    # the memo must not be trusted (the change time moved), the changed tensor must miss.
    f = src / "target" / "model.safetensors"
    st = f.stat()
    tensors = load_file(str(f))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(f), metadata={"format": "pt"})
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    calls.clear()
    rep, data, _ = run(src, tmp_path / "c", cache)
    assert len(calls) == MATRICES // 2  # the target file's tensors are hashed again, the source's are not
    c = rep["summary"]["cache"]
    assert c["hits"] == MATRICES - 1 and c["stored"] == 1
    _, fresh, _ = run(src, tmp_path / "d", None, use_cache=False)
    assert data == fresh
