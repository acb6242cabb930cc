"""Kill/resume sweep for issue 4: how often does a killed transfer resume to the same bytes, and how
much work does a resume redo?

Builds the small synthetic pair of the crash tests (bench/crash.py: 4 layers x 7 modules = 28 units), makes an
uninterrupted reference run, then for every unit index k and every test-hook point (mid_write,
before_journal, after_unit) plus the finishing step, and for N kills at seeded random times, runs

    python -m bench.crash transfer ... --device cpu --rank 16 --quiet    (SIGKILLed)
    python -m bench.crash transfer ... --device cpu --rank 16 --quiet    (the same command: resume)

and checks that the killed run left nothing under the output name and that the resumed adapter is
byte-identical to the reference. Units redone by a resume = the unit in flight at the kill (1 for
mid_write / before_journal and for a random kill that landed inside the unit loop, 0 for
after_unit / finish) + journaled units the resume did not reuse (should always be 0).

    python -m bench.resume_sweep                       # 84 + 1 hook kills, 20 random kills, 2 workers
    python -m bench.resume_sweep --random 50 --workers 1

Prints a summary and writes bench/results/resume_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import BENCH
from bench.crash import KILLED, SOURCE_SPEC, TARGET_SPEC, build_pair, child_env, journal_units, run_child, transfer_command, watch_run
from lowmem_crosslora.io.partial import ADAPTER_NAME, REPORT_NAME
from lowmem_crosslora.io.runstate import state_dir_for

POINTS = ("mid_write", "before_journal", "after_unit")
TIMEOUT = 300


def one_case(case: dict, root: Path, work: Path, ref: bytes, units: int) -> dict:
    out = work / case["name"] / "out"
    out.parent.mkdir(parents=True)
    args = transfer_command(root, out)
    t0 = time.monotonic()
    if case["kind"] == "hook":
        p = run_child(args, kill=case["spec"], timeout=TIMEOUT)
        rc, err = p.returncode, p.stderr
    else:
        rc, _, err = watch_run(args, out, kill_after=case["delay"], timeout=TIMEOUT)
    res = dict(case, killed_rc=rc, kill_seconds=round(time.monotonic() - t0, 3))
    final_exists = out.exists() and any(out.iterdir())
    if rc == 0 or (rc == KILLED and final_exists and not state_dir_for(out).exists()):
        res.update(outcome="finished_before_kill", byte_identical=(out / ADAPTER_NAME).read_bytes() == ref)
        return res
    if rc != KILLED:
        res.update(outcome="unexpected_exit", stderr=err[-2000:])
        return res
    res["left_final_files"] = final_exists
    res["journaled"] = j = len(journal_units(out))
    t1 = time.monotonic()
    r = run_child(args, timeout=TIMEOUT)
    res["resume_seconds"] = round(time.monotonic() - t1, 3)
    if r.returncode != 0:
        res.update(outcome="resume_failed", stderr=r.stderr[-2000:])
        return res
    resumed = json.loads((out / REPORT_NAME).read_text())["summary"]["resumed_units"]
    if case["kind"] == "hook":
        in_flight = 1 if case["point"] in ("mid_write", "before_journal") else 0
    else:
        in_flight = 1 if j < units else 0  # upper bound: the kill may also have landed between two units
    res.update(
        outcome="resumed",
        resumed_units=resumed,
        lost_journaled=j - resumed,
        redone_units=in_flight + (j - resumed),
        byte_identical=(out / ADAPTER_NAME).read_bytes() == ref,
        state_left=state_dir_for(out).exists(),
    )
    shutil.rmtree(out.parent, ignore_errors=True)
    return res


def summarize(cases: list[dict]) -> dict:
    resumed = [c for c in cases if c["outcome"] == "resumed"]
    killed = [c for c in cases if c["outcome"] in ("resumed", "resume_failed")]

    def part(sel: list[dict]) -> dict:
        rs = [c for c in sel if c["outcome"] == "resumed"]
        redone = [c["redone_units"] for c in rs]
        return {
            "kills_mid_run": sum(1 for c in sel if c["outcome"] in ("resumed", "resume_failed")),
            "finished_before_kill": sum(1 for c in sel if c["outcome"] == "finished_before_kill"),
            "resumed_ok": len(rs),
            "byte_identical": sum(1 for c in rs if c["byte_identical"]),
            "left_files_under_final_name": sum(1 for c in sel if c.get("left_final_files")),
            "journaled_units_lost": sum(c["lost_journaled"] for c in rs),
            "redone_units_mean": round(statistics.fmean(redone), 3) if redone else None,
            "redone_units_max": max(redone) if redone else None,
            "reused_units_mean": round(statistics.fmean(c["resumed_units"] for c in rs), 2) if rs else None,
            "failures": [c["name"] for c in sel if c["outcome"] in ("resume_failed", "unexpected_exit") or not c.get("byte_identical", True)],
        }

    by_point = {p: part([c for c in cases if c.get("point") == p]) for p in (*POINTS, "finish")}
    return {
        "all": part(cases),
        "hook": part([c for c in cases if c["kind"] == "hook"]),
        "random": part([c for c in cases if c["kind"] == "random"]),
        "by_point": by_point,
        "kill_points_tried": len(killed),
        "byte_identical": sum(1 for c in resumed if c["byte_identical"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--random", type=int, default=20, help="kills at seeded random times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="cases run side by side")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "resume_sweep.json")
    a = ap.parse_args()

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crosslora-resume-sweep-") as tmp:
        root = build_pair(Path(tmp))
        ref_out = root / "reference"
        t0 = time.monotonic()
        rc, loop, err = watch_run(transfer_command(root, ref_out), ref_out, env=child_env(), timeout=TIMEOUT)
        ref_seconds = time.monotonic() - t0
        if rc != 0:
            raise SystemExit(f"reference run failed: {err}")
        ref = (ref_out / ADAPTER_NAME).read_bytes()
        units = json.loads((ref_out / REPORT_NAME).read_text())["summary"]["units"]

        cases: list[dict] = []
        for k in range(units):
            for point in POINTS:
                cases.append({"name": f"{point}-{k}", "kind": "hook", "point": point, "k": k, "spec": f"{point}:{k}"})
        cases.append({"name": "finish-0", "kind": "hook", "point": "finish", "k": 0, "spec": "finish:0"})
        rng = random.Random(a.seed)
        for i in range(a.random):
            cases.append({"name": f"random-{i}", "kind": "random", "delay": round(rng.uniform(0, loop), 4)})

        work = root / "cases"
        work.mkdir()
        done = 0

        def job(case: dict) -> dict:
            nonlocal done
            r = one_case(case, root, work, ref, units)
            done += 1
            flag = "ok" if r.get("byte_identical") else r["outcome"]
            print(
                f"[{done:>3}/{len(cases)}] {case['name']:<20} {r['outcome']:<22} journaled={r.get('journaled', '-')!s:>3} "
                f"reused={r.get('resumed_units', '-')!s:>3} redone={r.get('redone_units', '-')!s:>2} {flag}",
                flush=True,
            )
            return r

        with ThreadPoolExecutor(max_workers=max(1, a.workers)) as pool:
            results = list(pool.map(job, cases))

    summary = summarize(results)
    doc = {
        "command": " ".join(["python", "-m", "bench.resume_sweep", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "models": {"source": SOURCE_SPEC.__dict__, "target": TARGET_SPEC.__dict__, "units": units, "adapter_bytes": len(ref)},
        "reference_seconds": round(ref_seconds, 3),
        "reference_loop_seconds": round(loop, 3),
        "sweep_seconds": round(time.monotonic() - t_start, 1),
        "workers": a.workers,
        "summary": summary,
        "cases": results,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    s = summary
    print()
    print(
        f"kill points tried (killed mid-run): {s['kill_points_tried']}  (hook {s['hook']['kills_mid_run']}, random {s['random']['kills_mid_run']}; "
        f"{s['all']['finished_before_kill']} random kills came after the run had finished)"
    )
    a_ = s["all"]
    print(f"resumed byte-identical: {s['byte_identical']} / {s['kill_points_tried']}; files left under the final name: {a_['left_files_under_final_name']}")
    print(
        f"units redone per resume: mean {a_['redone_units_mean']}, max {a_['redone_units_max']} of {units}; journaled units lost: {a_['journaled_units_lost']}"
    )
    for p, v in s["by_point"].items():
        print(f"  {p:<15} kills {v['kills_mid_run']:>3}  identical {v['byte_identical']:>3}  redone mean {v['redone_units_mean']}  max {v['redone_units_max']}")
    r_ = s["random"]
    print(f"  {'random':<15} kills {r_['kills_mid_run']:>3}  identical {r_['byte_identical']:>3}  redone mean {r_['redone_units_mean']} (upper bound)")
    if s["all"]["failures"]:
        print(f"FAILURES: {s['all']['failures']}")
    print(f"wrote {a.out} ({doc['sweep_seconds']} s)")


if __name__ == "__main__":
    main()
