"""The streaming transfer: plan -> for each unit: read W_s, W_t -> bases -> project -> write.

One base matrix is resident at a time (plus the next one, read ahead while the current one is
factored, when the budget has room for both). Source bases that a later unit needs again (the
'depth' layer map can feed one source layer to several target layers) are kept until last use.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapter import Adapter, adapter_fingerprint, check_finite, load_adapter
from .architectures import CANONICAL
from .bases import Basis, BlockedMatrix, InCoreMatrix, SvdSettings, exact_svd, finish, randomized_svd, scipy_svd, seed_for
from .cache import BasisCache, CacheKey, HashMemo
from .checkpoint import Checkpoint, open_checkpoint
from .errors import BudgetError, CrossLoraError, InputError, Interrupted
from .fused import unit_tensors
from .gguf_lora import check_out_format, finish_hooks, output_files
from .memory import Budget, MatrixPlan, host_anon_bytes, release_free_memory, stored_bytes, tune_allocator
from .output import ADAPTER_NAME, REPORT_NAME, Layout, PartialOutput, journal_fingerprint, state_dir_for
from .plan import Plan, Unit, build_plan
from .project import project_factors
from .report import build_report
from .sizes import format_size

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Mapped checkpoint pages this process may keep resident before it unmaps the shards (they are
# reclaimable either way; unmapping keeps the process's resident size honest on small machines).
FILE_PAGES_KEPT = 256 * 1024**2
# Cache entries read and verified ahead of the projection, on as many threads.
ENTRIES_AHEAD = 2
Progress = Callable[[int, int, str], None]


@dataclass
class TransferOptions:
    rank: int = 320
    layer_map: str = "index"
    device: str = "auto"
    dtype: str | None = None  # output dtype; default: the source adapter's
    seed: int = 0
    oversample: int = 10
    niter: int = 2
    exact_ratio: float = 0.5
    compute_dtype: str = "float32"
    max_memory: int | None = None
    max_gpu_memory: int | None = None
    resume: bool = True
    restart: bool = False
    force: bool = False
    prefetch: bool = True
    cache_dir: str | None = None  # the basis cache's folder; None: the platform's user cache folder
    use_cache: bool = True
    cache_limit: int | None = None  # bytes; None: cache.DEFAULT_LIMIT
    target_format: str = "peft"  # "vllm": one r and lora_alpha for every module (see vllm.py)
    allow_pickle: bool = False  # read an adapter_model.bin with torch.load(weights_only=True)
    out_format: str = "peft"  # peft, gguf (a llama.cpp LoRA GGUF) or both; written at the end, so not in result_key

    def result_key(self) -> dict[str, Any]:
        """The options that change the output's bytes (the budget and device only move rounding)."""
        return {
            "rank": self.rank,
            "layer_map": self.layer_map,
            "dtype": self.dtype,
            "seed": self.seed,
            "oversample": self.oversample,
            "niter": self.niter,
            "exact_ratio": self.exact_ratio,
            "compute_dtype": self.compute_dtype,
            "target_format": self.target_format,
        }

    def svd_settings(self) -> SvdSettings:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InputError(f"unknown compute dtype {self.compute_dtype!r}; choose float32 or float64")
        if self.oversample < 0 or self.niter < 0:
            raise InputError("--oversample and --niter must not be negative")
        return SvdSettings(self.rank, self.oversample, self.niter, self.exact_ratio, COMPUTE_DTYPES[self.compute_dtype])


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, else cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available to this torch build")
        return name
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("--device mps: MPS is not available on this machine")
        return name
    raise InputError(f"unknown --device {name!r}; choose auto, cpu, cuda or mps")


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output_dir(out: Path, inputs: list[Path], force: bool) -> None:
    o = out.resolve()
    for p in inputs:
        q = p.resolve()
        if _inside(o, q):
            raise InputError(f"output folder {out} lies inside the input {p}; choose a folder outside the inputs")
        if _inside(q, o):
            raise InputError(f"the input {p} lies inside the output folder {out}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"output folder {out} is not empty; use --force to replace it")


def run_fingerprint(adapter: Adapter, source: Checkpoint, target: Checkpoint, opts: TransferOptions) -> str:
    payload = {
        "adapter": adapter_fingerprint(adapter),
        "source": source.fingerprint(),
        "target": target.fingerprint(),
        "options": opts.result_key(),
        "version": __version__,  # a release may change results: never mix two in one file
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


class StopFlag:
    """SIGINT / SIGTERM set a flag; the engine stops at the next clean point.

    The engine looks at the flag before every base matrix it factors, after every row block of a
    blocked (out-of-core) SVD pass, and between units; a unit that is written is always journaled
    first. A second SIGINT raises KeyboardInterrupt at once (the state on disk is crash-safe, so
    that is safe too). Re-entrant: a nested `with` of the same flag keeps the outer handlers.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}
        self._depth = 0

    def __enter__(self) -> StopFlag:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()

    def check(self) -> None:
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            raise Interrupted(f"stopped by {name}; finished units are kept")


@dataclass
class MatrixJob:
    ckpt: Checkpoint
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

    def checks(self) -> None:
        self.stop.check()
        self.budget.check()

    # ---- reading --------------------------------------------------------------------------
    def _finite(self, job: MatrixJob, t: torch.Tensor) -> None:
        if not all_finite(t):
            raise InputError(f"{job.role} model: weight {job.weight} contains NaN or Inf")

    def load(self, job: MatrixJob, device: str) -> torch.Tensor:
        """The whole matrix widened to the compute dtype on `device`, widened one block at a time."""
        m, n = job.shape
        dtype = self.settings.compute_dtype
        if device == "cpu":
            W = torch.empty(m, n, dtype=dtype)
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
        m, n = job.shape
        q = self.settings.q_for(job.r, m, n)
        try:
            return self._plan(job, retained, device)
        except BudgetError:
            if self._pending is not None:
                # A cache write in flight holds memory the matrix needs: finish it, plan again.
                cost = self._pending[1]
                self.flush_cache()
                release_free_memory()
                try:
                    return self._plan(job, max(0, retained - cost), device)
                except BudgetError:
                    pass
            if not self.matrices:
                raise
            # Name the budget that works for the whole run, not just for this matrix: a larger
            # matrix later on would otherwise refuse the figure this message gives.
            # What the planner needs now, plus room for what the process's own figure creeps up by
            # over a run (allocator fragmentation, kept bases measured rather than modelled).
            creep = max(0, host_anon_bytes() - self.budget.baseline - self.retained)
            need = int(smallest_budget(self.budget, self.matrices, creep) * 1.25) + (8 << 20)
            raise BudgetError(
                f"--max-memory {format_size(self.budget.max_host)} is too small for this transfer "
                f"(a {m} x {n} matrix at q={q} does not fit): the smallest budget that works is about {_size_at_least(need)}"
            ) from None

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
                    continue
                preloaded: torch.Tensor | None = None
                if ahead is not None and ahead[0] == i:
                    mplan, fut = ahead[1], ahead[2]
                    preloaded = fut.result()
                else:
                    mplan = self.matrix_plan(job, self.retained)
                ahead = None
                nxt = jobs[i + 1] if i + 1 < len(jobs) else None
                if self.prefetch and nxt is not None and mplan.mode == "in-core" and not self._is_cached(nxt):
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
                self.store(job, basis)
                release_free_memory()
                job.ckpt.release_pages(self.budget.file_baseline + FILE_PAGES_KEPT)
                yield job, basis, used
        finally:
            for fut, _ in entries.values():  # a stopped run: let the reads in flight end
                fut.cancel()

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


def smallest_budget(budget: Budget, matrices: list[tuple[int, int, int, int, str, int]], creep: int = 0) -> int:
    """The smallest --max-memory under which the budget's own planner fits every matrix of a run
    (with the bases held at that point, plus `creep`: what the measured figure runs above the
    modelled one), found by bisection over that planner."""

    def fits(limit: int) -> bool:
        probe = copy.copy(budget)
        probe.max_host = limit
        try:
            for m, n, q, r, dtype, retained in matrices:
                probe.plan_matrix(m, n, q, r, dtype, retained=retained, held=retained + creep)
        except BudgetError:
            return False
        return True

    lo, hi = 0, max(2 * budget.max_host, 1 << 20)
    while not fits(hi):
        lo, hi = hi, 2 * hi
        if hi > 1 << 60:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _size_at_least(n: int) -> str:
    """A size for people, rounded up so that the figure printed is never below n."""
    for unit, scale in (("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3)):
        if n < 1000 * scale or unit == "GiB":
            return f"{math.ceil(n / scale * 10) / 10:.1f} {unit}"
    raise AssertionError("unreachable")


def basis_bytes(b: Basis) -> int:
    """Host bytes a kept basis holds (one kept on a GPU is counted by the GPU's own figures)."""
    if b.U.device.type != "cpu":
        return 0
    return int(b.U.numel() + b.V.numel() + b.S.numel()) * b.U.element_size()


def transfer(
    adapter: str | Path,
    source: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Transfer a PEFT LoRA adapter from `source` to `target`, writing a PEFT adapter folder at `out`.

    Options are the fields of TransferOptions. Returns the report (also written as
    crosslora_report.json in the output folder). SIGINT and SIGTERM raise Interrupted at the next
    clean point; the hidden state folder next to `out` then resumes with the same call. Warnings
    (the basis cache's: it never fails a transfer) go to `warn`, or to warnings.warn.
    """
    return _guarded([(adapter, out)], source, target, progress=progress, log=log, warn=warn, batch=False, **options)[0]


def transfer_batch(
    adapters: list[tuple[str | Path, str | Path]],
    source: str | Path,
    target: str | Path,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Transfer several adapters of one source model onto one target: `adapters` lists
    (adapter folder, output folder) pairs. Each base matrix is read and factored once for all of
    them; each output is the same, byte for byte, as a transfer of that adapter alone.

    Every input is checked before any work starts. An output that already holds this very
    transfer (same inputs and options: a rerun of a batch that finished some of its outputs) is
    left as it is and its report returned; interrupted outputs resume. Returns the reports in the
    order given.
    """
    if not adapters:
        raise InputError("no adapter to transfer")
    return _guarded(adapters, source, target, progress=progress, log=log, warn=warn, batch=True, **options)


def _guarded(pairs: list[tuple[str | Path, str | Path]], source: str | Path, target: str | Path, **kw: Any) -> list[dict[str, Any]]:
    with StopFlag() as stop:
        try:
            return _transfer(pairs, source, target, stop=stop, **kw)
        except KeyboardInterrupt:  # a second Ctrl-C: the state on disk is crash-safe, so this is resumable too
            raise Interrupted("stopped by SIGINT; finished units are kept") from None


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


def finished_report(out: Path, fingerprint: str, files: tuple[str, ...] = (ADAPTER_NAME,)) -> dict[str, Any] | None:
    """The report of a finished transfer in `out` made with this fingerprint and holding `files`, or None."""
    try:
        report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("run_fingerprint") != fingerprint or not all((out / f).is_file() for f in files):
        return None
    return report


def _prepare(ad: Adapter, out_path: Path, src: Checkpoint, tgt: Checkpoint, opts: TransferOptions, batch: bool, say: Callable[[str], None]) -> Task:
    """Check one adapter and its output, plan it, and open (or resume) its journaled output."""
    plan = build_plan(ad, src, tgt, rank=opts.rank, layer_map=opts.layer_map, dtype=opts.dtype, target_format=opts.target_format)
    check_finite(ad)
    fingerprint = run_fingerprint(ad, src, tgt, opts)
    task = Task(ad, out_path, plan, fingerprint)
    if batch and not opts.force:
        done = finished_report(out_path, fingerprint, output_files(opts.out_format))
        if done is not None:
            say(f"{out_path}: already holds this transfer; kept")
            task.report = done
            return task
    check_output_dir(out_path, [ad.path, src.path, tgt.path], opts.force)
    state = state_dir_for(out_path)
    if state.exists() and opts.resume and not opts.restart:
        old = journal_fingerprint(out_path)
        if old is not None and old != fingerprint:
            raise InputError(
                f"an interrupted transfer in {state} was made with other inputs or options "
                "(the adapter, a model's weight files, or an option that changes the result); "
                "rerun it with the same ones to resume, or pass --restart to start over"
            )
    return task


def _open_output(task: Task, opts: TransferOptions, say: Callable[[str], None], label: str) -> None:
    plan = task.plan
    expected = {u.uid: [u.out_a, u.out_b] for u in plan.units}
    layout = Layout(plan.layout(), regions=plan.regions())
    partial = PartialOutput(task.out, layout, task.fingerprint, resume=opts.resume and not opts.restart, expected=expected)
    if partial.resumed:
        damaged = len(partial.redone_corrupt) + partial.bad_lines
        say(
            f"{label}resuming: {len(partial.done)} of {len(plan.units)} units already done"
            + (f"; {damaged} damaged journal entries or units are redone" if damaged else "")
            + (f"; repaired: {', '.join(partial.repairs)}" if partial.repairs else "")
        )
    task.partial = partial
    task.records = {uid: rec["record"] for uid, rec in partial.done.items()}
    task.pending = [u for u in plan.units if u.uid not in partial.done]
    task.resumed = len(plan.units) - len(task.pending)


def _transfer(
    pairs: list[tuple[str | Path, str | Path]],
    source: str | Path,
    target: str | Path,
    *,
    stop: StopFlag,
    batch: bool,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    opts = TransferOptions(**options)
    if opts.cache_dir is not None:
        opts.cache_dir = str(opts.cache_dir)
    say = log or (lambda msg: None)
    t_start = time.perf_counter()
    tune_allocator()
    settings = opts.svd_settings()
    src = open_checkpoint(source, "source")
    tgt = open_checkpoint(target, "target")
    check_out_format(opts.out_format, tgt.family.name)
    outs = [Path(o) for _, o in pairs]
    seen_out: dict[Path, int] = {}
    for i, o in enumerate(outs):
        key = o.resolve()
        if key in seen_out:
            raise InputError(f"adapters {seen_out[key] + 1} and {i + 1} would both be written to {o}; give each its own output folder")
        seen_out[key] = i
    # Every input is checked, every output planned, before any work starts.
    tasks: list[Task] = []
    for (adapter, _), out_path in zip(pairs, outs, strict=True):
        ad = load_adapter(adapter, allow_pickle=opts.allow_pickle)
        if batch:
            for o in outs:
                if _inside(o.resolve(), ad.path.resolve()) or _inside(ad.path.resolve(), o.resolve()):
                    raise InputError(f"output folder {o} and the adapter {ad.path} lie inside one another; choose folders apart")
        tasks.append(_prepare(ad, out_path, src, tgt, opts, batch, say))
    for t in tasks:  # skipped biases / modules_to_save, a rank vLLM needs --max-lora-rank for
        for msg in t.plan.warnings:
            msg = f"{t.adapter.path}: {msg}" if batch else msg
            if warn is not None:
                warn(msg)
            else:
                warnings.warn(msg, UserWarning, stacklevel=3)
    device = resolve_device(opts.device)
    budget = Budget(opts.max_memory, opts.max_gpu_memory, device)
    stop.check()
    todo = [t for t in tasks if t.report is None]
    for t in todo:
        _open_output(t, opts, say, f"{t.out}: " if batch else "")

    total = sum(len(t.plan.units) for t in todo)
    done_count = sum(t.resumed for t in todo)
    if progress and todo:
        progress(done_count, total, "")

    engine: Engine | None = None
    if todo:
        with stop:
            cache = open_cache(opts.cache_dir, opts.cache_limit, warn) if opts.use_cache else None
            engine = Engine(todo[0].plan, settings, budget, device, opts.seed, stop, prefetch=opts.prefetch, cache=cache)
            budget.start()
            try:
                _run_units(engine, todo, src, tgt, progress, done_count, total)
                for t in todo:
                    assert t.partial is not None
                    bad = t.partial.verify_all([u.uid for u in t.plan.units])
                    if bad:
                        raise CrossLoraError(f"{t.out}: verification failed for units {', '.join(bad[:5])}; rerun to redo them")
            finally:
                engine.close()
                budget.stop()
                for t in todo:
                    if t.partial is not None:
                        t.partial.close()

    seconds = time.perf_counter() - t_start
    for t in todo:
        assert engine is not None and t.partial is not None
        report = build_report(
            plan=t.plan,
            records=[t.records[u.uid] for u in t.plan.units],
            adapter=t.adapter,
            source=src,
            target=tgt,
            options=asdict(opts),
            device=device,
            seconds=seconds,
            peak_host=budget.peak_host,
            peak_file=budget.peak_file,
            peak_gpu=budget.peak_gpu,
            gpu_baseline=budget.gpu_baseline,
            phases=engine.phases,
            baseline_host=budget.baseline,
            budget_host=budget.max_host,
            fallbacks=engine.fallbacks,
            resumed_units=t.resumed,
            version=__version__,
        )
        report["run_fingerprint"] = t.fingerprint
        report["summary"]["cache"] = engine.cache.stats() if engine.cache is not None else None
        if batch:
            report["summary"]["batch"] = {"adapters": len(tasks), "transferred_in_this_run": len(todo)}
        extra, drop = finish_hooks(opts.out_format, t.plan, t.adapter, tgt)
        t.partial.finish(adapter_config(t.plan, t.adapter, str(target)), report, opts.force, extra=extra, drop=drop)
        t.report = report
    return [t.report for t in tasks if t.report is not None]


class CacheWarning(UserWarning):
    """The basis cache could not be read or written (the transfer goes on without it)."""


def open_cache(cache_dir: str | Path | None, limit: int | None, warn: Callable[[str], None] | None) -> BasisCache:
    if warn is None:

        def warn(msg: str) -> None:
            warnings.warn(msg, CacheWarning, stacklevel=2)

    return BasisCache(cache_dir, limit, warn)


def _run_units(
    engine: Engine,
    tasks: list[Task],
    src: Checkpoint,
    tgt: Checkpoint,
    progress: Progress | None,
    done_count: int,
    total: int,
) -> None:
    """Factor each base matrix the tasks' pending units need once, in layer order, and project
    every task's unit on it. A unit id names one (target layer, module): the same pair of base
    matrices in every task of the run."""
    src_id, tgt_id = src.identity(), tgt.identity()
    groups: dict[str, list[tuple[Task, Unit]]] = {}
    for t in tasks:
        for u in t.pending:
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

    # What the budget must fit, matrix by matrix, with the source bases held as the loop below holds them.
    held: dict[str, int] = {}
    itemsize = engine.settings.compute_dtype.itemsize
    for job, gi in zip(jobs, job_group, strict=True):
        m, n = job.shape
        engine.matrices.append((m, n, engine.settings.q_for(job.r, m, n), job.r, job.ckpt.info(job.weight).dtype, sum(held.values())))
        sw = groups[order[gi]][0][1].source_weight
        if job.role == "source":
            held[job.weight] = itemsize * (m + n + 1) * job.r
        elif last_use.get(sw) == gi:
            held.pop(sw, None)

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
            out_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.plan.out_dtype]
            # Fused target modules and padded ranks write their rows of the output tensors (fused.py).
            tensors = unit_tensors(u.out_a, u.out_b, u.placement, proj.A, proj.B, out_dtype)
            engine.phases["project"] += time.perf_counter() - t_proj
            seconds = time.perf_counter() - unit_t0
            record = {
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
                "energy_retained": None if proj.energy_retained is None else round(proj.energy_retained, 6),
                "seconds": round(seconds, 3),
                "device": basis.device if bs.device == basis.device else f"{bs.device}+{basis.device}",
                "method": {"source": bs.method, "target": basis.method},
                "mode": {"source": splan.mode, "target": mplan.mode},
            }
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
        del Us, Vs
        if last_use.get(sw) == gi:
            b, _ = src_bases.pop(sw)
            engine.retained -= basis_bytes(b)


def adapter_config(plan: Plan, ad: Adapter, target_name: str) -> dict[str, Any]:
    """A PEFT LoraConfig for the target: same r, alpha and per-module scales as the source."""
    src = ad.config
    return {
        "alpha_pattern": plan.alpha_pattern,
        "base_model_name_or_path": target_name,
        "bias": "none",
        "fan_in_fan_out": plan.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": plan.layers_to_transform,
        "lora_alpha": plan.out_alpha if plan.out_alpha != int(plan.out_alpha) else int(plan.out_alpha),
        "lora_dropout": float(src.get("lora_dropout", 0.0) or 0.0),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": plan.out_rank,
        "rank_pattern": plan.rank_pattern,
        "revision": None,
        "target_modules": plan.target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": plan.use_rslora,
    }


def precompute_bases(
    model: str | Path,
    rank: int,
    *,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    cache_limit: int | None = None,
    seed: int = 0,
    oversample: int = 10,
    niter: int = 2,
    exact_ratio: float = 0.5,
    compute_dtype: str = "float32",
    max_memory: int | None = None,
    max_gpu_memory: int | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Factor every q, k, v, o, gate, up, down weight of every layer of `model` at
    r = min(rank, m, n) into the basis cache, so that a later transfer only projects.

    A transfer's r is min(rank, m, n, m', n'): exact-SVD entries serve any r up to the stored one;
    randomized entries serve only the same r (see cache.py), that is, a transfer with the same
    --rank, seed and SVD settings whose other model does not clip r further.
    """
    opts = TransferOptions(rank=rank, device=device, seed=seed, oversample=oversample, niter=niter, exact_ratio=exact_ratio, compute_dtype=compute_dtype)
    settings = opts.svd_settings()
    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    t_start = time.perf_counter()
    tune_allocator()
    ckpt = open_checkpoint(model, "model")
    dev = resolve_device(device)
    ident = ckpt.identity()
    jobs = []
    for layer in range(ckpt.dims.num_layers):
        for name in CANONICAL:
            w = ckpt.weight_name(layer, name)
            if not ckpt.has(w):
                continue
            info = ckpt.info(w)
            if len(info.shape) != 2:
                continue
            m, n = int(info.shape[0]), int(info.shape[1])
            jobs.append(MatrixJob(ckpt, w, (m, n), min(rank, m, n), "model", ident))
    if not jobs:
        raise InputError(f"model {ckpt.path}: none of the weights q, k, v, o, gate, up, down was found")
    budget = Budget(max_memory, max_gpu_memory, dev)
    cache = open_cache(cache_dir, cache_limit, warn)
    with StopFlag() as stop:
        engine = Engine(None, settings, budget, dev, seed, stop, prefetch=True, cache=cache)
        for job in jobs:
            m, n = job.shape
            engine.matrices.append((m, n, settings.q_for(job.r, m, n), job.r, ckpt.info(job.weight).dtype, 0))
        budget.start()
        methods: dict[str, int] = {}
        try:
            if progress:
                progress(0, len(jobs), "")
            for k, (job, basis, _mplan) in enumerate(engine.run_jobs(jobs), start=1):
                methods[basis.method] = methods.get(basis.method, 0) + 1
                del basis
                if progress:
                    progress(k, len(jobs), job.weight)
        finally:
            engine.close()
            budget.stop()
    return {
        "kind": "bases",
        "model": str(ckpt.path),
        "rank": rank,
        "device": dev,
        "matrices": len(jobs),
        "methods": dict(sorted(methods.items())),
        "cache": cache.stats(),
        "seconds": round(time.perf_counter() - t_start, 3),
        "phase_seconds": {k: round(v, 3) for k, v in engine.phases.items()},
    }
