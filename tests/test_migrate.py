"""migrate (issue 19): a manifest of 6 adapters over 2 (source, target) pairs, on this machine and on
a local Ray cluster started in the test process.

- outputs byte-identical to one-by-one transfers, and a rerun keeps them all;
- a bad job is reported with its error while the rest finish (exit 4);
- a Ray worker SIGKILLed mid-job: Ray retries the task, the retry resumes the partial output, and the
  bytes are those of an uninterrupted run;
- a bad manifest is one line and exit 2 before any job starts.
Ray tests skip cleanly (saying so) when `ray` is not installed (`pip install '.[cluster]'`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli

from bench import REPO
from bench.crash import DELAY_VAR, SOURCE_SPEC, build_pair, journal_units
from lowmem_crosslora import transfer
from lowmem_crosslora.io.partial import ADAPTER_NAME
from lowmem_crosslora.migrate.command import migrate
from lowmem_crosslora.services.synthetic import ModelSpec, write_adapter, write_model

SRC = ModelSpec("llama", 64, 128, 2, 4, 2, 16, vocab=64)
TGT_A = ModelSpec("qwen2", 96, 192, 3, 4, 2, 24, vocab=64)
TGT_B = ModelSpec("qwen2", 128, 256, 2, 4, 2, 32, vocab=64)
OPTS: dict[str, Any] = {"rank": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One source, two targets, three adapters: six jobs over two pairs, and each job's reference bytes
    from a lone transfer without the cache."""
    root = tmp_path_factory.mktemp("library")
    write_model(root / "src", SRC, dtype="float32", seed=0)
    write_model(root / "tA", TGT_A, dtype="float32", seed=1)
    write_model(root / "tB", TGT_B, dtype="float32", seed=2)
    jobs = []
    for i in range(3):
        write_adapter(root / f"lora{i}", SRC, rank=4, alpha=8, seed=10 + i)
        jobs.extend({"adapter": f"lora{i}", "source": "src", "target": t, "out": f"moved/{t}-lora{i}"} for t in ("tA", "tB"))
    lib = {"root": root, "jobs": jobs, "ref": lone_transfers(root, jobs, torch.get_num_threads())}
    # Ray runs a task of one CPU with one math thread, and float sums depend on the thread count:
    # its outputs are compared with lone transfers made with one thread too.
    lib["ref1"] = lone_transfers(root, jobs, 1)
    return lib


def lone_transfers(root: Path, jobs: list[dict[str, Any]], threads: int) -> dict[str, bytes]:
    """Each job's adapter bytes from a transfer of its own, without the cache, on `threads` threads."""
    ref = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for j in jobs:
            key = Path(j["out"]).name
            lone = root / f"lone-{threads}" / key
            transfer(root / j["adapter"], root / j["source"], root / j["target"], lone, use_cache=False, **OPTS)
            ref[key] = (lone / ADAPTER_NAME).read_bytes()
    finally:
        torch.set_num_threads(before)
    return ref


def write_manifest(folder: Path, jobs: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def place(library: dict[str, Any], work: Path, jobs: list[dict[str, Any]] | None = None) -> Path:
    """A manifest in `work` whose relative inputs point at the library's models (links), outputs in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tA", "tB", "lora0", "lora1", "lora2"):
        if not (work / name).exists():
            (work / name).symlink_to(library["root"] / name)
    return write_manifest(work, jobs if jobs is not None else library["jobs"])


def assert_outputs(library: dict[str, Any], work: Path, ref: str = "ref") -> None:
    for key, data in library[ref].items():
        assert (work / "moved" / key / ADAPTER_NAME).read_bytes() == data, key


def test_local_migration_equals_one_by_one_and_a_rerun_keeps_it(library: dict[str, Any], tmp_path: Path) -> None:
    manifest = place(library, tmp_path)
    lines: list[str] = []
    s = migrate(manifest, log=lines.append, cache_dir=str(tmp_path / "cache"), **OPTS)
    assert (s["done"], s["kept"], s["failed"]) == (6, 0, 0)
    assert_outputs(library, tmp_path)
    # the bases were shared: one batch per pair, each base factored once
    assert {p["mode"] for p in s["pairs"].values()} == {"batch"} and len(s["pairs"]) == 2
    assert sum(1 for ln in lines if "line " in ln and ": done" in ln) == 6
    again = migrate(manifest, cache_dir=str(tmp_path / "cache"), **OPTS)
    assert (again["done"], again["kept"], again["failed"]) == (0, 6, 0)
    assert_outputs(library, tmp_path)


def test_a_bad_job_is_listed_while_the_rest_finish(library: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_adapter = tmp_path / "broken"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text("{not json")
    jobs = [*library["jobs"], {"adapter": "broken", "source": "src", "target": "tA", "out": "moved/broken"}]
    manifest = place(library, tmp_path, jobs)
    summary = tmp_path / "summary.json"
    log = tmp_path / "migrate.log"
    rc, out, err = run_cli(["migrate", "--manifest", str(manifest), "--rank", "16", "--device", "cpu", "--summary", str(summary), "--log", str(log)], capsys)
    assert rc == 4, err
    assert err.strip().splitlines()[-1].startswith("error: 1 of 7 jobs failed")
    s = json.loads(summary.read_text())
    assert (s["done"], s["failed"]) == (6, 1)
    failed = [j for j in s["jobs"] if j["status"] == "failed"]
    assert failed[0]["line"] == 7 and "adapter_config.json" in failed[0]["error"] and failed[0]["exit_code"] == 2
    assert "broken" in out and "failed" in out  # the table lists it
    assert len([ln for ln in log.read_text().splitlines() if "] line " in ln]) == 7
    assert_outputs(library, tmp_path)
    assert not (tmp_path / "moved" / "broken").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "no jobs"),
        ('{"adapter": "a", "source": "s", "target": "t"}\n', "'out' must be a non-empty string"),
        ('{"adapter": "a", "source": "s", "target": "t", "out": "o", "refin": true}\n', "unknown field 'refin'"),
        ('{"adapter": "a", "source": "s", "target": "t", "out": "o", "refine": "yes"}\n', "'refine' must be true or false"),
        ('{"adapter": "a", "source": "s", "target": "t", "out": "o"}\n{"adapter": "b", "source": "s", "target": "t", "out": "o"}\n', "also line 1"),
        ("[1, 2\n", "not valid JSON"),
        ("# a comment\nnot json\n", "line 2: not a JSON object"),
    ],
)
def test_a_bad_manifest_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, match: str) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    rc, _out, err = run_cli(["migrate", "--manifest", str(manifest)], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


# ---- on Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    """A local Ray cluster of 2 CPUs in this process. Its workers import this checkout and install
    bench/crash.py's fault from the environment: a delay after every journaled unit, so that a
    worker can be killed mid-job."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install '.[cluster]' to run the Ray tests")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), DELAY_VAR: "0.15", "OMP_NUM_THREADS": "1"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env, "worker_process_setup_hook": "bench.crash.install_from_env"},
    )
    yield ray
    ray.shutdown()


def test_ray_migration_equals_one_by_one_with_a_bad_job(library: dict[str, Any], tmp_path: Path, ray_cluster: Any) -> None:
    jobs = [*library["jobs"], {"adapter": "lora0", "source": "src", "target": "missing-model", "out": "moved/bad"}]
    manifest = place(library, tmp_path, jobs)
    s = migrate(manifest, ray="auto", cache_dir=str(tmp_path / "cache"), **OPTS)
    assert (s["done"], s["failed"]) == (6, 1), s["jobs"]
    assert s["jobs"][-1]["status"] == "failed" and "missing-model" in s["jobs"][-1]["error"]
    assert_outputs(library, tmp_path, "ref1")
    # each pair's bases were computed once, by its pair task; the job tasks only read them
    stats = [p for key, p in s["pairs"].items() if "missing-model" not in key]
    assert len(stats) == 2 and all(p["matrices"] > 0 and p["cache"]["stored"] + p["cache"]["hits"] == p["matrices"] for p in stats), stats
    for key in library["ref1"]:  # (the two pair tasks run at once and share the source's bases)
        cache = json.loads((tmp_path / "moved" / key / "crosslora_report.json").read_text())["summary"]["cache"]
        assert cache["stored"] == 0 and cache["hits"] > 0, (key, cache)
    assert len({j["pid"] for j in s["jobs"]}) >= 2  # the jobs ran in the cluster's workers, not here
    again = migrate(manifest, ray="auto", cache_dir=str(tmp_path / "cache"), **OPTS)
    assert (again["kept"], again["failed"]) == (6, 1)


def test_a_killed_worker_is_retried_to_the_same_bytes(tmp_path: Path, ray_cluster: Any) -> None:
    """SIGKILL the worker running a job once it has journaled a few units: Ray retries the task, the
    retry resumes the partial output, and the adapter is byte-identical to an uninterrupted transfer."""
    root = build_pair(tmp_path / "pair")  # 28 units, each followed by the workers' delay
    lone = tmp_path / "lone"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task of one CPU computes
    try:
        transfer(root / "adapter", root / "source", root / "target", lone, use_cache=False, **OPTS)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "moved"
    manifest = write_manifest(tmp_path, [{"adapter": str(root / "adapter"), "source": str(root / "source"), "target": str(root / "target"), "out": str(out)}])
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(migrate(manifest, ray="auto", cache_dir=str(tmp_path / "cache"), **OPTS)))
    runner.start()
    lock = out.parent / f".{out.name}.crosslora-lock"
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        if lock.exists() and len(journal_units(out)) >= 3:
            pid = int(lock.read_text().split()[0])
            os.kill(pid, 9)
            killed = pid
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "the job finished before it could be killed"
    job = result["jobs"][0]
    assert job["status"] == "done" and job["pid"] != killed, job
    assert (out / ADAPTER_NAME).read_bytes() == (lone / ADAPTER_NAME).read_bytes()
    assert SOURCE_SPEC.layers * 7 == len(json.loads((out / "crosslora_report.json").read_text())["units"])


def test_a_refine_job_runs_and_a_rerun_keeps_it(tmp_path: Path) -> None:
    """A job with "refine": true distils the adapter onto the target (refine's defaults), after the
    pair's transfers; a rerun keeps it."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from helpers import refine_pair

    m = refine_pair(tmp_path / "pair")
    jobs = [
        {"adapter": str(m["adapter"]), "source": str(m["source"]), "target": str(m["target"]), "out": "moved/transferred"},
        {"adapter": str(m["adapter"]), "source": str(m["source"]), "target": str(m["target"]), "out": "moved/refined", "refine": True},
    ]
    manifest = write_manifest(tmp_path, jobs)
    s = migrate(manifest, cache_dir=str(tmp_path / "cache"), **OPTS)
    assert [(j["kind"], j["status"]) for j in s["jobs"]] == [("transfer", "done"), ("refine", "done")], s["jobs"]
    report = json.loads((tmp_path / "moved" / "refined" / "crosslora_report.json").read_text())
    assert report["kind"] == "refine"
    again = migrate(manifest, cache_dir=str(tmp_path / "cache"), **OPTS)
    assert [j["status"] for j in again["jobs"]] == ["kept", "kept"]
