"""The unit loop of a transfer: each base matrix the pending units need is factored once, in layer
order, and every task's unit is projected on it and written (then journaled) before the next."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem_crosslora.architectures import CANONICAL
from lowmem_crosslora.dtypes import TAG_TORCH
from lowmem_crosslora.io.adapter import Adapter
from lowmem_crosslora.io.partial import PartialOutput
from lowmem_crosslora.io.reader import CheckpointReader
from lowmem_crosslora.linalg.bases import Basis, SvdSettings
from lowmem_crosslora.linalg.fused import unit_tensors
from lowmem_crosslora.linalg.projection import project_factors
from lowmem_crosslora.services.factoring import Engine, MatrixJob, Progress, basis_bytes
from lowmem_crosslora.services.memory import MatrixPlan, RunMatrix
from lowmem_crosslora.services.plan import Plan, Unit


@dataclass
class Task:
    """One adapter of a run: its plan, its output's journaled state, its finished units' records."""

    adapter: Adapter
    out: Path
    plan: Plan
    fingerprint: str
    partial: PartialOutput | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: list[Unit] = field(default_factory=list)
    resumed: int = 0
    report: dict[str, Any] | None = None  # set when the output already holds this transfer

    @property
    def index_of(self) -> dict[str, int]:
        return {u.uid: k for k, u in enumerate(self.plan.units)}


def run_units(
    engine: Engine,
    tasks: list[Task],
    src: CheckpointReader,
    tgt: CheckpointReader,
    progress: Progress | None,
    done_count: int,
    total: int,
) -> None:
    """Factor each base matrix the tasks' pending units need once, in layer order, and project
    every task's unit on it. A unit id names one (target layer, module): the same pair of base
    matrices in every task of the run."""
    groups, order, jobs, job_group, last_use = schedule([(t, u) for t in tasks for u in t.pending], src, tgt)
    engine.matrices.extend(residency(jobs, job_group, groups, order, last_use, engine.settings))
    src_bases: dict[str, tuple[Basis, MatrixPlan]] = {}
    unit_t0 = time.perf_counter()
    index_of = {id(t): t.index_of for t in tasks}
    for (job, basis, mplan), gi in zip(engine.run_jobs(jobs), job_group, strict=True):
        if job.role == "source":
            src_bases[job.weight] = (basis, mplan)
            engine.retained += basis_bytes(basis)
            engine.budget.sample()
            continue
        members = groups[order[gi]]
        sw = members[0][1].source_weight
        bs, splan = src_bases[sw]
        # Project where the target basis is (the GPU when there is one): only the small factors move.
        dev = basis.U.device
        Us, Vs = bs.U.to(dev), bs.V.to(dev)
        for t, u in members:
            t_proj = time.perf_counter()
            A = t.adapter.read(u.lora.a_name).to(dev)
            B = t.adapter.read(u.lora.b_name).to(dev)
            proj = project_factors(A, B, Us, Vs, basis.U, basis.V)
            # Fused target modules and padded ranks write their rows of the output tensors (fused.py).
            tensors = unit_tensors(u.out_a, u.out_b, u.placement, proj.A, proj.B, TAG_TORCH[t.plan.out_dtype])
            engine.phases["project"] += time.perf_counter() - t_proj
            record = _record(u, proj.energy_retained, time.perf_counter() - unit_t0, (bs, splan), (basis, mplan))
            # A finished unit is written and journaled before any stop: the stop flag is looked at
            # again before the next matrix (run_jobs) and between row blocks of a blocked SVD.
            t_write = time.perf_counter()
            assert t.partial is not None
            t.partial.write_unit(index_of[id(t)][u.uid], u.uid, tensors, record)
            engine.phases["write"] += time.perf_counter() - t_write
            t.records[u.uid] = record
            done_count += 1
            unit_t0 = time.perf_counter()
            if progress:
                progress(done_count, total, u.uid)
        # Nothing of this group outlives it but what is counted: the kept source bases.
        del Us, Vs, A, B, proj, tensors, bs, splan, basis, mplan
        if last_use.get(sw) == gi:
            b, _ = src_bases.pop(sw)
            engine.retained -= basis_bytes(b)
            del b


Groups = dict[str, list[tuple[Any, Unit]]]  # unit id -> (task, unit) pairs
Schedule = tuple[Groups, list[str], list[MatrixJob], list[int], dict[str, int]]


def schedule(pending: list[tuple[Any, Unit]], src: CheckpointReader, tgt: CheckpointReader) -> Schedule:
    """The pending (task, unit) pairs grouped by unit id, the groups in layer and module order, the
    matrix jobs (each source weight once, before the first group that needs it; each group's target
    weight), each job's group, and each source weight's last group. The task is only carried along:
    `plan` schedules a plan's units with none."""
    src_id, tgt_id = src.identity(), tgt.identity()
    groups: Groups = {}
    for t, u in pending:
        groups.setdefault(u.uid, []).append((t, u))
    module_order = {m: k for k, m in enumerate(CANONICAL)}
    order = sorted(groups, key=lambda uid: (groups[uid][0][1].target_layer, module_order.get(groups[uid][0][1].module, len(module_order)), uid))
    last_use: dict[str, int] = {}
    for i, uid in enumerate(order):
        last_use[groups[uid][0][1].source_weight] = i
    jobs: list[MatrixJob] = []
    job_group: list[int] = []
    seen: set[str] = set()
    for i, uid in enumerate(order):
        u = groups[uid][0][1]
        if u.source_weight not in seen:
            seen.add(u.source_weight)
            jobs.append(MatrixJob(src, u.source_weight, u.source_shape, u.r, "source", src_id))
            job_group.append(i)
        jobs.append(MatrixJob(tgt, u.target_weight, u.target_shape, u.r, "target", tgt_id))
        job_group.append(i)
    return groups, order, jobs, job_group, last_use


def residency(
    jobs: list[MatrixJob], job_group: list[int], groups: Groups, order: list[str], last_use: dict[str, int], settings: SvdSettings
) -> list[RunMatrix]:
    """What the budget must fit, matrix by matrix, with the source bases held as run_units holds them."""
    held: dict[str, int] = {}
    itemsize = settings.compute_dtype.itemsize
    out: list[RunMatrix] = []
    for job, gi in zip(jobs, job_group, strict=True):
        m, n = job.shape
        out.append((m, n, settings.q_for(job.r, m, n), job.r, job.ckpt.info(job.weight).dtype, sum(held.values())))
        sw = groups[order[gi]][0][1].source_weight
        if job.role == "source":
            held[job.weight] = itemsize * (m + n + 1) * job.r
        elif last_use.get(sw) == gi:
            held.pop(sw, None)
    return out


def run_matrices(units: list[Unit], src: CheckpointReader, tgt: CheckpointReader, settings: SvdSettings) -> list[tuple[str, RunMatrix]]:
    """The matrices a transfer of these units factors, in its order, each with the bases held beside
    it, and what each is for: "source:<weight>" (factored once, however many units use it) or
    "target:<unit id>"."""
    groups, order, jobs, job_group, last_use = schedule([(None, u) for u in units], src, tgt)
    keys = [f"source:{j.weight}" if j.role == "source" else f"target:{order[gi]}" for j, gi in zip(jobs, job_group, strict=True)]
    return list(zip(keys, residency(jobs, job_group, groups, order, last_use, settings), strict=True))


def _record(u: Unit, energy: float | None, seconds: float, source: tuple[Basis, MatrixPlan], target: tuple[Basis, MatrixPlan]) -> dict[str, Any]:
    """The report's and journal's record of one finished unit."""
    (bs, splan), (basis, mplan) = source, target
    return {
        "uid": u.uid,
        "module": u.module,
        "source_layer": u.source_layer,
        "source_module": u.source_module,
        "target_layer": u.target_layer,
        "target_module": u.target_module,
        "source_shape": list(u.source_shape),
        "target_shape": list(u.target_shape),
        "lora_rank": u.rank,
        "r": u.r,
        "energy_retained": None if energy is None else round(energy, 6),
        "seconds": round(seconds, 3),
        "device": basis.device if bs.device == basis.device else f"{bs.device}+{basis.device}",
        "method": {"source": bs.method, "target": basis.method},
        "mode": {"source": splan.mode, "target": mplan.mode},
    }
