"""The factoring engine: each base matrix read (ahead, when the budget has room), factored under the
memory budget, or taken from the basis cache; freshly computed bases written to the cache."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora.errors import BudgetError, CrossLoraError, InputError
from lowmem_crosslora.io.hashing import HashMemo
from lowmem_crosslora.io.reader import CheckpointReader
from lowmem_crosslora.linalg.bases import (
    Basis,
    BlockedMatrix,
    InCoreMatrix,
    SvdSettings,
    exact_svd,
    finish,
    randomized_svd,
    randomized_svd_stack,
    scipy_svd,
    seed_for,
)
from lowmem_crosslora.services.cache import BasisCache, CacheKey
from lowmem_crosslora.services.memory import Budget, MatrixPlan, stored_bytes
from lowmem_crosslora.services.plan import Plan
from lowmem_crosslora.services.stop import StopFlag
from lowmem_crosslora.sysmem import release_free_memory

# Mapped checkpoint pages this process may keep resident before it unmaps the shards (they are
# reclaimable either way; unmapping keeps the process's resident size honest on small machines).
FILE_PAGES_KEPT = 256 * 1024**2


# Cache entries read and verified ahead of the projection, on as many threads.
ENTRIES_AHEAD = 2


# How far ahead in the job list a stack looks for matrices of the head's shape (Engine.stack).
STACK_WINDOW = 64


Progress = Callable[[int, int, str], None]


@dataclass
class MatrixJob:
    ckpt: CheckpointReader
    weight: str
    shape: tuple[int, int]
    r: int
    role: str  # "source" or "target"
    identity: str


@dataclass
class Engine:
    plan: Plan | None
    settings: SvdSettings
    budget: Budget
    device: str
    seed: int
    stop: StopFlag
    prefetch: bool = True
    cache: BasisCache | None = None
    # Most same-shape matrices factored together in one batched range finder (randomized_svd_stack);
    # 1: one at a time. The bases equal the unstacked ones to rounding.
    stack: int = 1
    retained: int = 0  # bytes of bases held for later units
    # (m, n, q, r, stored dtype, bytes of bases held) of every matrix the run factors, in order
    matrices: list[tuple[int, int, int, int, str, int]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    # Wall seconds by phase: reading and widening base weights, SVDs, projection, writing.
    phases: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "svd": 0.0, "project": 0.0, "write": 0.0})
    _pool: ThreadPoolExecutor | None = None
    _entry_pool: ThreadPoolExecutor | None = None
    _hashes: dict[tuple[str, str], str] = field(default_factory=dict)
    # On an accelerator the host is idle while the device factors: the next weights' content
    # hashes (hashlib releases the GIL) are computed there, ahead, on a thread of their own.
    _hasher: ThreadPoolExecutor | None = None
    _hash_futs: dict[tuple[str, str], Future[str]] = field(default_factory=dict)
    # The cache write in flight (one at a time, on its own thread, overlapping the next SVD) and
    # the host bytes it holds (the basis and its serialized copy), counted as retained meanwhile.
    _writer: ThreadPoolExecutor | None = None
    _pending: tuple[Future[None], int] | None = None
    # Bases factored in a stack ahead of their turn: job index -> (basis, plan), counted in `retained`
    # (host bases) or in the GPU's own figures (device bases) until yielded.
    _stacked: dict[int, tuple[Basis, MatrixPlan]] = field(default_factory=dict)
    stacks: list[int] = field(default_factory=list)  # the size of every stack factored

    def checks(self) -> None:
        self.stop.check()
        self.budget.check()

    # ---- reading --------------------------------------------------------------------------
    def _finite(self, job: MatrixJob, t: torch.Tensor) -> None:
        if not all_finite(t):
            raise InputError(f"{job.role} model: weight {job.weight} contains NaN or Inf")

    def load(self, job: MatrixJob, device: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole matrix widened to the compute dtype on `device` (into `out` when given), widened
        one block at a time."""
        m, n = job.shape
        dtype = self.settings.compute_dtype
        if out is not None and device != "cpu":
            out.copy_(job.ckpt.read(job.weight).to(device=device))
            self._finite(job, out)
            return out
        if device == "cpu":
            W = torch.empty(m, n, dtype=dtype) if out is None else out
            # Row blocks as the planner counts them (native * min(m, 1024) * n): a block read is
            # private memory when the reader copies (safetensors slices) or dequantizes (GGUF).
            step = max(1, min(1024, (16 << 20) // (2 * n)))
            for s in range(0, m, step):
                e = min(m, s + step)
                W[s:e].copy_(job.ckpt.read_rows(job.weight, s, e))
                self._finite(job, W[s:e])
            return W
        W = job.ckpt.read(job.weight).to(device=device).to(dtype)
        self._finite(job, W)
        return W

    def reader(self, job: MatrixJob) -> Callable[[int, int], torch.Tensor]:
        def read_rows(start: int, stop: int) -> torch.Tensor:
            block = job.ckpt.read_rows(job.weight, start, stop)
            self._finite(job, block)
            return block

        return read_rows

    # ---- factoring ------------------------------------------------------------------------
    def _plan(self, job: MatrixJob, retained: int, device: str | None = None) -> MatrixPlan:
        m, n = job.shape
        return self.budget.plan_matrix(m, n, self.settings.q_for(job.r, m, n), job.r, job.ckpt.info(job.weight).dtype, retained=retained, prefer_device=device)

    def matrix_plan(self, job: MatrixJob, retained: int, device: str | None = None) -> MatrixPlan:
        """The job's plan; a refusal names the smallest budget for the whole run (Budget.smallest_for
        over this engine's matrices), the same figure `plan` names, first matrix included."""
        if self.budget.run_matrices is not self.matrices:
            self.budget.run_matrices = self.matrices
        try:
            return self._plan(job, retained, device)
        except BudgetError:
            if self._pending is None:
                raise
            # A cache write in flight holds memory the matrix needs: finish it, plan again.
            cost = self._pending[1]
            self.flush_cache()
            release_free_memory()
            return self._plan(job, max(0, retained - cost), device)

    def factor(self, job: MatrixJob, mplan: MatrixPlan, preloaded: torch.Tensor | None = None) -> tuple[Basis, MatrixPlan]:
        m, n = job.shape
        s = self.settings
        r, q = job.r, s.q_for(job.r, m, n)
        seed = seed_for(job.identity, job.weight, r, self.seed)
        t0 = time.perf_counter()
        dev = torch.device(mplan.device)
        try:
            if mplan.mode == "in-core":
                if preloaded is not None:
                    W = preloaded
                else:
                    t_read = time.perf_counter()
                    W = self.load(job, mplan.device)
                    self.phases["read"] += time.perf_counter() - t_read
                t_svd = time.perf_counter()
                if s.uses_exact(r, m, n, mplan.device):
                    U, S, V = exact_svd(W, r)
                    method = "exact"
                else:
                    U, S, V = randomized_svd(InCoreMatrix(W), r, q, s.niter, seed, dev, s.compute_dtype)
                    method = "full-width" if q >= min(m, n) else "randomized"
                del W
            else:
                t_svd = time.perf_counter()  # blocked: reading is interleaved with the passes
                op = BlockedMatrix(self.reader(job), (m, n), mplan.block_rows, dev, s.compute_dtype, check=self.checks)
                U, S, V = randomized_svd(op, r, q, s.niter, seed, dev, s.compute_dtype)
                method = "full-width-blocked" if q >= min(m, n) else "randomized-blocked"
            basis = finish(U, S, V, method, mplan.device, t0)
            self.phases["svd"] += time.perf_counter() - t_svd
            return basis, mplan
        except (CrossLoraError, KeyboardInterrupt):
            raise
        except (RuntimeError, NotImplementedError, MemoryError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if mplan.device != "cpu":
                self.fallbacks.append(f"{job.weight}: {mplan.device} failed ({first_line[:120]}); used the CPU")
                if mplan.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                cpu_plan = self.matrix_plan(job, 0, device="cpu")
                return self.factor(job, cpu_plan)
            self.fallbacks.append(f"{job.weight}: torch failed ({first_line[:120]}); used scipy")
            W64 = self.load(job, "cpu").numpy()
            U, S, V = scipy_svd(W64, r)
            return finish(U.to(s.compute_dtype), S.to(s.compute_dtype), V.to(s.compute_dtype), "scipy-exact", "cpu", t0), MatrixPlan("cpu", "in-core", m, 0, 0)

    def _factored(self, job: MatrixJob, basis: Basis) -> None:
        """After a basis is computed, before it is handed on: into the cache, freed memory returned,
        mapped pages past the allowance dropped."""
        self.store(job, basis)
        release_free_memory()
        job.ckpt.release_pages(self.budget.file_baseline + FILE_PAGES_KEPT)

    # ---- stacks of same-shape matrices -----------------------------------------------------
    def _stackable(self, job: MatrixJob, mplan: MatrixPlan) -> bool:
        m, n = job.shape
        return self.stack > 1 and mplan.mode == "in-core" and not self.settings.uses_exact(job.r, m, n, mplan.device)

    def _stack_peers(self, jobs: list[MatrixJob], i: int, mplan: MatrixPlan) -> list[int]:
        """Later jobs (within STACK_WINDOW) of job i's shape, rank and stored dtype, not cached and not
        yet factored, as many as Engine.stack and the budget allow beside job i."""
        head = jobs[i]
        m, n = head.shape
        dtype = head.ckpt.info(head.weight).dtype
        key = (head.shape, head.r, dtype)
        peers: list[int] = []
        for j in range(i + 1, min(len(jobs), i + 1 + STACK_WINDOW)):
            if len(peers) + 1 >= self.stack:
                break
            o = jobs[j]
            if j in self._stacked or (o.shape, o.r, o.ckpt.info(o.weight).dtype) != key or self._is_cached(o):
                continue
            if not self.budget.stack_fits(m, n, self.settings.q_for(head.r, m, n), head.r, dtype, len(peers) + 2, self.retained, mplan.device):
                break
            peers.append(j)
        return peers

    def factor_stack(self, jobs: list[MatrixJob], mplan: MatrixPlan, preloaded: torch.Tensor | None = None) -> list[Basis]:
        """Bases of same-shape jobs factored together (randomized_svd_stack), each with its own seed;
        `preloaded` is the first job's matrix, already read."""
        m, n = jobs[0].shape
        s = self.settings
        r, q = jobs[0].r, s.q_for(jobs[0].r, m, n)
        t0 = time.perf_counter()
        dev = torch.device(mplan.device)
        t_read = time.perf_counter()
        W = torch.empty(len(jobs), m, n, dtype=s.compute_dtype, device=dev)
        for k, job in enumerate(jobs):
            self.checks()
            if k == 0 and preloaded is not None:
                W[0].copy_(preloaded)
            else:
                self.load(job, mplan.device, out=W[k])
        self.phases["read"] += time.perf_counter() - t_read
        t_svd = time.perf_counter()
        seeds = [seed_for(job.identity, job.weight, r, self.seed) for job in jobs]
        factors = randomized_svd_stack(W, r, q, s.niter, seeds, dev, s.compute_dtype)
        del W
        method = "full-width" if q >= min(m, n) else "randomized"
        bases = [finish(U, S, V, method, mplan.device, t0) for U, S, V in factors]
        self.phases["svd"] += time.perf_counter() - t_svd
        self.stacks.append(len(jobs))
        return bases

    def _factor_with_peers(self, jobs: list[MatrixJob], i: int, mplan: MatrixPlan, preloaded: torch.Tensor | None) -> tuple[Basis, MatrixPlan] | None:
        """Job i (stackable) factored in a stack with its peers, theirs kept for their turn; None where
        it has no peers or the stack failed (job i is then factored alone, its peers in their turn)."""
        peers = self._stack_peers(jobs, i, mplan)
        if not peers:
            return None
        try:
            bases = self.factor_stack([jobs[i]] + [jobs[j] for j in peers], mplan, preloaded)
        except (CrossLoraError, KeyboardInterrupt):
            raise
        except (RuntimeError, NotImplementedError, MemoryError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.fallbacks.append(f"{jobs[i].weight}: a stack of {len(peers) + 1} failed ({first_line[:120]}); factored one at a time")
            if mplan.device.startswith("cuda"):
                torch.cuda.empty_cache()
            return None
        for j, b in zip(peers, bases[1:], strict=True):
            self._stacked[j] = (b, mplan)
            self.retained += basis_bytes(b)
        return bases[0], mplan

    # ---- the basis cache -------------------------------------------------------------------
    def _content(self, job: MatrixJob) -> str:
        """The weight's content hash, computed once per run (one pass over its stored bytes)."""
        k = (str(job.ckpt.path), job.weight)
        h = self._hashes.get(k)
        if h is None:
            t0 = time.perf_counter()
            fut = self._hash_futs.pop(k, None)
            h = fut.result() if fut is not None else job.ckpt.content_hash(job.weight, self._memo())
            self.phases["hash"] = self.phases.get("hash", 0.0) + time.perf_counter() - t0
            self._hashes[k] = h
        return h

    def _memo(self) -> HashMemo | None:
        return self.cache.memo if self.cache is not None else None

    def prehash(self, jobs: list[MatrixJob]) -> None:
        """Start hashing these jobs' weights ahead, when the engine runs on an accelerator (on the
        CPU a hashing thread would only take cycles from the SVD)."""
        if self.cache is None or self.device == "cpu":
            return
        for job in jobs:
            k = (str(job.ckpt.path), job.weight)
            if k in self._hashes or k in self._hash_futs:
                continue
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslora-hash")
            self._hash_futs[k] = self._hasher.submit(job.ckpt.content_hash, job.weight, self._memo())

    def cache_key(self, job: MatrixJob, device: str) -> CacheKey:
        """The key of the basis this engine would compute for the job on `device`."""
        m, n = job.shape
        s = self.settings
        cd = str(s.compute_dtype).replace("torch.", "")
        dtype = job.ckpt.info(job.weight).dtype
        if s.uses_exact(job.r, m, n, device):
            return CacheKey(self._content(job), dtype, (m, n), "exact", cd)
        seed = seed_for(job.identity, job.weight, job.r, self.seed)
        return CacheKey(self._content(job), dtype, (m, n), "randomized", cd, job.r, s.q_for(job.r, m, n), s.niter, seed, torch.device(device).type)

    def _lookup_device(self, job: MatrixJob) -> str:
        """The device the job would be factored on (what the planner picks now, else the engine's)."""
        try:
            return self._plan(job, self.retained).device
        except BudgetError:
            return self.device

    def cache_lookup(self, job: MatrixJob, extra: int = 0) -> tuple[CacheKey, str, int] | None:
        """(key, device, bytes held once loaded) of the job's cache entry when there is one and
        loading it fits the memory budget beside `extra` bytes more; None otherwise."""
        if self.cache is None:
            return None
        device = self._lookup_device(job)
        key = self.cache_key(job, device)
        size = self.cache.entry_bytes(key)
        if size is None:
            return None
        m, n = job.shape
        held = self.settings.compute_dtype.itemsize * (m + n + 1) * job.r
        # Loading holds the entry's bytes and the basis taken from them, then the basis alone.
        if not self.budget.fits_host(size + held, self.retained + extra):
            return None
        return key, device, held

    def _load_cached(self, job: MatrixJob, key: CacheKey) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str] | None, float]:
        t0 = time.perf_counter()
        assert self.cache is not None
        got = self.cache.get(key, job.r)
        return got, time.perf_counter() - t0

    def cached(self, job: MatrixJob, loading: Future[Any] | None = None) -> tuple[Basis, MatrixPlan] | None:
        """The job's basis from the cache, verified, on the device it would have been computed on;
        None when absent, damaged, or when loading it would not fit the memory budget. `loading`
        is a read of the entry already started on the read-ahead thread."""
        t0 = time.perf_counter()
        found = self.cache_lookup(job)
        if found is None:
            if self.cache is not None:
                self.cache.misses += 1
            if loading is not None:
                loading.result()
            return None
        key, device, held = found
        got, _ = loading.result() if loading is not None else self._load_cached(job, key)
        if got is None:
            self.phases["cache"] = self.phases.get("cache", 0.0) + time.perf_counter() - t0
            return None
        U, S, V, method = got
        if device != "cpu":
            U, S, V = U.to(device), S.to(device), V.to(device)
        basis = Basis(U, S, V, f"cached:{method}", device, time.perf_counter() - t0)
        self.phases["cache"] = self.phases.get("cache", 0.0) + time.perf_counter() - t0
        return basis, MatrixPlan(device, "cached", 0, held if device == "cpu" else 0, 0 if device == "cpu" else held)

    def store(self, job: MatrixJob, basis: Basis) -> None:
        """Keep a freshly computed basis (never a fallback's: scipy's LAPACK driver is not the
        engine's method, and a rerun should try the engine's again). The write (serializing,
        checksum, fsync) runs on a thread of its own while the next matrix is factored; one write
        is in flight at a time, and its bytes count as held memory until it ends."""
        if self.cache is None or basis.method.startswith(("scipy", "cached")):
            return
        self.flush_cache()
        if not self.cache.writable:
            return
        key = self.cache_key(job, basis.device)
        cost = 2 * int(basis.U.numel() + basis.S.numel() + basis.V.numel()) * basis.U.element_size()
        if not self.budget.fits_host(cost, self.retained):  # no room beside the next matrix: write now
            t0 = time.perf_counter()
            self.cache.put(key, basis, name=job.weight, model=str(job.ckpt.path))
            self.phases["cache"] = self.phases.get("cache", 0.0) + time.perf_counter() - t0
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslora-cache")
        self.retained += cost
        self._pending = (self._writer.submit(self.cache.put, key, basis, job.weight, str(job.ckpt.path)), cost)

    def flush_cache(self) -> None:
        """Wait for the cache write in flight, if any."""
        if self._pending is None:
            return
        fut, cost = self._pending
        self._pending = None
        t0 = time.perf_counter()
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation: never a reason to fail
            if self.cache is not None:
                self.cache.writable = False
                self.cache._warn(f"basis cache: writing an entry failed ({e}); continuing without storing bases")
        finally:
            self.retained -= cost
            self.phases["cache"] = self.phases.get("cache", 0.0) + time.perf_counter() - t0

    def _prefetch_bytes(self, job: MatrixJob, device: str) -> int:
        m, n = job.shape
        return stored_bytes(job.ckpt.info(job.weight).dtype) * m * n

    def run_jobs(self, jobs: list[MatrixJob]) -> Iterator[tuple[MatrixJob, Basis, MatrixPlan]]:
        """Factor jobs in order, reading the next in-core matrix while this one computes."""
        ahead: tuple[int, MatrixPlan, Future[torch.Tensor]] | None = None
        # Cache entries being read and verified ahead (file reads and SHA-256 release the GIL, so
        # two run beside the projection): job index -> (future, host bytes it holds).
        entries: dict[int, tuple[Future[Any], int]] = {}
        # (Projecting on one thread while entries are read would be faster on 2 cores, 1.8 s
        # instead of 3.1 s in a warm 3B transfer, but BLAS sums in another order with another
        # thread count: the output's bytes would then differ from a cold run's. Measured; kept out.)
        try:
            for i, job in enumerate(jobs):
                self.checks()
                self.prehash(jobs[i + 1 : i + 3])
                if i in self._stacked:  # factored in an earlier job's stack
                    if ahead is not None and ahead[0] == i:
                        ahead[2].result()
                        ahead = None
                    basis, used = self._stacked.pop(i)
                    self.retained -= basis_bytes(basis)
                    if self.cache is not None:
                        self.cache.misses += 1
                    self._factored(job, basis)
                    yield job, basis, used
                    del basis, used
                    continue
                loading, loading_bytes = entries.pop(i, (None, 0))
                hit = self.cached(job, loading)
                self.retained -= loading_bytes
                if hit is not None:
                    if ahead is not None and ahead[0] == i:  # read ahead for nothing: drop it
                        ahead[2].result()
                        ahead = None
                    if self.prefetch:
                        self._read_entries_ahead(jobs, i, hit[1].host_bytes, entries)
                    yield job, hit[0], hit[1]
                    del hit
                    continue
                preloaded: torch.Tensor | None = None
                if ahead is not None and ahead[0] == i:
                    mplan, fut = ahead[1], ahead[2]
                    preloaded = fut.result()
                else:
                    mplan = self.matrix_plan(job, self.retained)
                ahead = None
                if self._stackable(job, mplan):
                    if preloaded is not None:
                        preloaded = preloaded.to(device=mplan.device).to(self.settings.compute_dtype)
                        self._finite(job, preloaded)
                    got = self._factor_with_peers(jobs, i, mplan, preloaded)
                    if got is not None:
                        del preloaded
                        self._factored(job, got[0])
                        yield job, got[0], got[1]
                        del got
                        continue
                nxt = jobs[i + 1] if i + 1 < len(jobs) else None
                if self.prefetch and nxt is not None and mplan.mode == "in-core" and (i + 1) not in self._stacked and not self._is_cached(nxt):
                    try:
                        nplan: MatrixPlan | None = self._plan(nxt, self.retained + mplan.host_bytes)
                    except BudgetError:  # no room to read ahead: the next matrix is planned on its own
                        nplan = None
                    extra = self._prefetch_bytes(nxt, nplan.device) if nplan is not None else 0
                    room = self.budget.host_room() - self.retained
                    if nplan is not None and nplan.mode == "in-core" and nplan.device == mplan.device and mplan.host_bytes + extra <= room:
                        if self._pool is None:
                            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslora-read")
                        ahead = (i + 1, nplan, self._pool.submit(self._read_ahead, nxt, nplan.device))
                if preloaded is not None:
                    t_read = time.perf_counter()
                    preloaded = preloaded.to(device=mplan.device).to(self.settings.compute_dtype)
                    self._finite(job, preloaded)
                    self.phases["read"] += time.perf_counter() - t_read
                basis, used = self.factor(job, mplan, preloaded)
                del preloaded
                self._factored(job, basis)
                yield job, basis, used
                del basis, used  # held from here on only as the caller holds it (and counts it)
        finally:
            for fut, _ in entries.values():  # a stopped run: let the reads in flight end
                fut.cancel()
            for b, _ in self._stacked.values():
                self.retained -= basis_bytes(b)
            self._stacked.clear()

    def _read_entries_ahead(self, jobs: list[MatrixJob], i: int, held: int, entries: dict[int, tuple[Future[Any], int]]) -> None:
        """Start reading the cache entries of the next ENTRIES_AHEAD jobs while they are cached
        and the budget holds them all beside the current basis (`held` bytes)."""
        for j in range(i + 1, min(len(jobs), i + 1 + ENTRIES_AHEAD)):
            if j in entries:
                continue
            found = self.cache_lookup(jobs[j], extra=held)  # entries in flight are counted as retained
            if found is None or self.cache is None:
                return
            size = (self.cache.entry_bytes(found[0]) or 0) + found[2]
            if self._entry_pool is None:
                self._entry_pool = ThreadPoolExecutor(max_workers=ENTRIES_AHEAD, thread_name_prefix="crosslora-entry")
            entries[j] = (self._entry_pool.submit(self._load_cached, jobs[j], found[0]), size)
            self.retained += size

    def _is_cached(self, job: MatrixJob) -> bool:
        return self.cache is not None and self.cache.entry_bytes(self.cache_key(job, self._lookup_device(job))) is not None

    def _read_ahead(self, job: MatrixJob, device: str) -> torch.Tensor:
        """Pure I/O, no torch kernels (running torch's OpenMP kernels on a second thread beside the
        SVD oversubscribes the cores and slows both): have the kernel read the tensor's bytes into
        the page cache, and map it in its stored dtype; it is widened on the main thread."""
        job.ckpt.advise(job.weight)
        return job.ckpt.read(job.weight)

    def close(self) -> None:
        self.flush_cache()
        if self._hasher is not None:
            for fut in self._hash_futs.values():
                fut.cancel()
            self._hasher.shutdown(wait=True)
            self._hasher = None
        if self.cache is not None:
            self.cache.memo.save()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        for pool in (self._pool, self._entry_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._entry_pool = None


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t, without torch.isfinite's temporaries (2.5x the tensor): any NaN or Inf
    makes the sum non-finite; only a sum that overflows needs the exact check, in small chunks."""
    if bool(torch.isfinite(t.sum())):
        return True
    flat = t.reshape(-1)
    step = 1 << 18
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def basis_bytes(b: Basis) -> int:
    """Host bytes a kept basis holds (one kept on a GPU is counted by the GPU's own figures)."""
    if b.U.device.type != "cpu":
        return 0
    return int(b.U.numel() + b.V.numel() + b.S.numel()) * b.U.element_size()


class CacheWarning(UserWarning):
    """The basis cache could not be read or written (the transfer goes on without it)."""


def open_cache(cache_dir: str | Path | None, limit: int | None, warn: Callable[[str], None] | None) -> BasisCache:
    if warn is None:

        def warn(msg: str) -> None:
            warnings.warn(msg, CacheWarning, stacklevel=2)

    return BasisCache(cache_dir, limit, warn)
