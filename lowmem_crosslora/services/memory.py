"""The memory budget: one object owns the numbers.

Host memory means this process's *anonymous* (private) resident memory (Linux: RssAnon in
/proc/self/status; elsewhere psutil's USS). Pages of the memory-mapped checkpoints are file-backed:
the kernel can drop them at any time and re-read them from disk, so they are reported apart
(RssFile) and do not count against --max-memory. --max-memory bounds the *whole process's* private
memory, the figure a user compares with free memory or a cgroup limit: the baseline the process holds
before any work (the Python interpreter and the torch libraries, about 160 MB with a CPU build of
torch, more with a CUDA build; measured at start) plus the working memory above it, which the planner
fits into what the baseline leaves. Reports give the split. GPU memory is the process's as the
driver counts it, CUDA context included (gpumem.py), bounded the same way by --max-gpu-memory.

Before each matrix the budget picks how to factor it (device, in-core or blocked, block size) from
a memory model; while running, a sampler thread watches the real figure and the engine stops
cleanly, keeping finished units, if the budget is crossed."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from lowmem_crosslora.dtypes import tag_bytes
from lowmem_crosslora.errors import BudgetError
from lowmem_crosslora.gpumem import process_gpu_bytes
from lowmem_crosslora.linalg.bases import InCoreMatrix, finish, randomized_svd
from lowmem_crosslora.linalg.projection import project_factors
from lowmem_crosslora.sizes import format_size
from lowmem_crosslora.sysmem import host_anon_bytes, host_file_bytes, host_resident, release_free_memory, tune_allocator

F32 = 4


# Headroom kept for allocator slack, Python objects and the writer's buffers.
SLACK = 4 * 1024**2


# The creep allowance: how far the measured working memory may run above the modelled held memory
# (the bases kept for later units) between matrices: allocator fragmentation and the run's own
# Python objects (unit records, journal lines, the output file's index). The planner reserves it
# in every plan, and the smallest budget it names includes it, so the figure named is the figure
# the run plans with; only a run whose measured creep goes past it plans from the measured figure.
CREEP = 3 * 1024**2


MIN_BLOCK_ROWS = 16


# The smallest budget named adds this to the measured baseline: processes measure baselines a few
# MiB apart (`plan`'s warm-up leaves about 3 MiB more than a transfer's), and the figure one names
# must work in the other.
BASELINE_MARGIN = 4 * 1024**2


# GPU headroom for the solvers' own workspaces (cuSOLVER QR and SVD), which grow with the panels.
GPU_SLACK = 16 * 1024**2


# One matrix of a run, in the order the run factors them: (m, n, q, r, stored dtype, bytes of bases
# held beside it).
RunMatrix = tuple[int, int, int, int, str, int]


@dataclass(frozen=True)
class MatrixPlan:
    """How one base matrix is factored."""

    device: str
    mode: str  # "in-core" or "blocked"
    block_rows: int
    host_bytes: int  # modelled extra host memory
    gpu_bytes: int  # modelled GPU memory


def panel_bytes(m: int, n: int, q: int, r: int) -> int:
    """Peak memory of the range finder beside the matrix, for the tall orientation M x N it uses.

    A power step holds the old basis, the new panel and the QR's output (2Mq + Nq); the last step
    holds Q, Bt = W^T Q, the small SVD's factors and workspace, and U = Q Vh^T (Mq + Mr + 3Nq + 4q^2).
    The kept result (U, V: (M + N) r) is counted by whoever keeps it.
    """
    M, N = max(m, n), min(m, n)
    return F32 * max(2 * M * q + N * q, M * q + M * r + 3 * N * q + 4 * q * q)


def stored_bytes(dtype: str) -> int:
    return tag_bytes(dtype)


def warm_up_libraries() -> None:
    """Run each linear-algebra kernel once at a small size, so the math libraries' persistent buffers
    (MKL / OpenBLAS workspaces, torch's kernels) are part of the baseline, not of the budget."""
    a = torch.randn(512, 256)
    q = torch.linalg.qr(a).Q
    torch.linalg.svd(a.T @ q, full_matrices=False)
    torch.linalg.svd(a[:64], full_matrices=False)
    b = torch.empty(512, 256, dtype=torch.bfloat16).copy_(a).float()
    torch.mm(b[:128], q.T[:, :128].contiguous().T.contiguous(), out=torch.empty(128, 512)) if False else b[:128] @ b[:128].T
    del a, q, b
    release_free_memory()


def warm_up_cuda(device: str) -> None:
    """Create the CUDA context and the cuBLAS / cuSOLVER handles and workspaces before measuring:
    they are fixed costs of using the GPU at all (hundreds of MB of host memory, tens of MB of GPU
    memory), not working memory of the transfer."""

    # A miniature of one unit, so that the kernels it uses are loaded (CUDA loads modules lazily, on
    # first use, into host memory) before the baseline is read.
    dev = torch.device(device)
    w = torch.randn(300, 200).to(torch.bfloat16).to(dev).float()
    bool(torch.isfinite(w.sum()))
    for W in (w, w.T.contiguous()):
        U, S, V = randomized_svd(InCoreMatrix(W), 16, 26, 1, 0, dev, torch.float32)
        b = finish(U, S, V, "warm-up", device, 0.0)
        U, S, V = randomized_svd(InCoreMatrix(W), 200, 200, 0, 0, dev, torch.float32)
    project_factors(torch.randn(4, W.shape[1], device=dev), torch.randn(W.shape[0], 4, device=dev), b.U, b.V, b.U, b.V)
    torch.cuda.synchronize(device)
    del w, W, U, S, V, b


def gpu_fixed_bytes(device: str) -> int:
    """GPU memory this process holds outside torch's allocator (CUDA context, library workspaces),
    as the driver counts it; 0 where the driver cannot tell (the report then says so)."""
    dev = torch.device(device)
    try:
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
    except (AttributeError, RuntimeError):
        return 0
    used = process_gpu_bytes(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    if used is None:
        return 0
    return max(0, used - int(torch.cuda.memory_reserved(dev)))


class Budget:
    """The run's memory limits and peaks. `limit` is --max-memory: the whole process's private memory;
    `max_host` is the working room the measured baseline leaves under it (negative when the
    baseline alone does not fit: every plan is then refused, naming the smallest budget)."""

    def __init__(self, max_host: int | None = None, max_gpu: int | None = None, device: str = "cpu") -> None:
        self.device = device
        tune_allocator()  # before the baseline, in every command alike, so that all measure the same figure
        warm_up_libraries()
        if device.startswith("cuda") and torch.cuda.is_available():
            try:
                warm_up_cuda(device)
            except RuntimeError:
                pass  # a failing CUDA solver shows again in the first unit, which then falls back to the CPU
        self.baseline = host_anon_bytes()
        self.file_baseline = host_file_bytes()
        self.host_default = max_host is None
        if max_host is None:
            max_host = self.baseline + int(0.5 * psutil.virtual_memory().available)
        self.limit = int(max_host)
        self.max_host = self.limit - self.baseline
        self.gpu_baseline = 0
        self.gpu_context = 0
        self.gpu_allocated0 = 0
        if device.startswith("cuda") and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            torch.cuda.reset_peak_memory_stats()
            # The process's GPU memory outside torch's allocator (the CUDA context, cuBLAS / cuSOLVER
            # workspaces) as the driver counts it, where it can tell; plus torch's live blocks.
            self.gpu_context = gpu_fixed_bytes(device)
            self.gpu_allocated0 = int(torch.cuda.memory_allocated())
            self.gpu_baseline = self.gpu_context + int(torch.cuda.memory_reserved())
            self.max_gpu = int(max_gpu) if max_gpu is not None else self.gpu_baseline + int(0.8 * free)
        elif device == "mps":  # unified memory: the device shares the host's
            self.max_gpu = int(max_gpu) if max_gpu is not None else self.limit
        else:
            self.max_gpu = int(max_gpu) if max_gpu is not None else 0
        self.peak_host = self.baseline
        self.peak_file = 0
        self.peak_gpu = 0
        self.exceeded: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The matrices of the run this budget plans, when known (the engine's or `plan`'s list):
        # a refusal names the smallest budget for all of them, not only for the matrix refused.
        self.run_matrices: list[RunMatrix] = []

    def named_baseline(self) -> int:
        """The baseline as the smallest-budget figures count it: the measured one plus a margin."""
        return self.baseline + BASELINE_MARGIN

    def whole_process(self, working: int) -> int:
        """The --max-memory (whole process) that leaves `working` bytes above what the process holds now."""
        return max(self.named_baseline(), host_anon_bytes() + BASELINE_MARGIN) + working

    def gpu_used(self) -> int:
        """The process's GPU memory now as the driver counts it: fixed cost plus torch's reserved blocks."""
        return self.gpu_context + int(torch.cuda.memory_reserved()) if self.device.startswith("cuda") and torch.cuda.is_available() else 0

    def gpu_room(self) -> int | None:
        """GPU memory left under --max-gpu-memory (None: no GPU limit applies)."""
        if not self.max_gpu:
            return None
        return self.max_gpu - self.gpu_used()

    def gpu_whole_process(self, working: int) -> int:
        """The --max-gpu-memory that leaves `working` bytes above what the process holds on the GPU now."""
        return self.gpu_used() + working

    # ---- planning -------------------------------------------------------------------------
    def host_room(self) -> int:
        """The room the planner gives matrices and held bases: the budget less the slack and the creep allowance."""
        return self.max_host - SLACK - CREEP

    def held_now(self, retained: int) -> int:
        """Held memory as the planner counts it: the modelled `retained` bytes, or the measured figure
        less the creep allowance when the process has crept further than the allowance."""
        return max(retained, host_anon_bytes() - self.baseline - CREEP)

    def plan_matrix(
        self, m: int, n: int, q: int, r: int, dtype: str, retained: int = 0, prefer_device: str | None = None, held: int | None = None
    ) -> MatrixPlan:
        """Pick device, in-core or blocked, and block size for one m x n matrix; BudgetError if none fits.

        `retained` is memory already held for the unit (the other model's basis); `held`, when given,
        replaces the measured figure (see held_now).
        """
        if held is None:
            held = self.held_now(retained)
        chosen = self._choose(m, n, q, r, dtype, self.host_room() - held, prefer_device or self.device)
        if chosen is None:
            raise BudgetError(self.refusal(m, n, q, r, dtype, retained))
        if chosen.device.startswith("cuda") and self.gpu_context + torch.cuda.memory_reserved() + chosen.gpu_bytes > self.max_gpu:
            torch.cuda.empty_cache()  # the allocator's cached blocks count in what the driver sees: hand them back first
        return chosen

    def _choose(self, m: int, n: int, q: int, r: int, dtype: str, room: int, device: str) -> MatrixPlan | None:
        """The plan for one matrix with `room` bytes of host memory for it; None if none fits."""
        panels = panel_bytes(m, n, q, r)
        native = stored_bytes(dtype)
        if device != "cpu":
            gpu_room = self._gpu_room(device)
            # GPU: the stored-dtype matrix is copied straight from the memory map (file pages, not
            # private memory) and widened on the device; the host holds only the result copied back.
            host_gpu = F32 * (m + n) * r
            per_row = (F32 + native) * n
            if per_row * m + panels <= gpu_room and host_gpu <= room:
                return MatrixPlan(device, "in-core", m, host_gpu, per_row * m + panels)
            rows = (gpu_room - panels) // per_row if gpu_room > panels else 0
            if rows >= MIN_BLOCK_ROWS and host_gpu <= room:
                rows = int(min(rows, m))
                return MatrixPlan(device, "blocked", rows, host_gpu, per_row * rows + panels)
        # CPU: in-core holds the widened matrix; blocked holds one native block and its widened copy.
        if F32 * m * n + native * min(m, 1024) * n + panels <= room:
            return MatrixPlan("cpu", "in-core", m, F32 * m * n + panels, 0)
        per_row = (F32 + native) * n
        rows = (room - panels) // per_row if room > panels else 0
        if rows >= MIN_BLOCK_ROWS:
            rows = int(min(rows, m))
            return MatrixPlan("cpu", "blocked", rows, per_row * rows + panels, 0)
        return None

    def _gpu_room(self, device: str) -> int:
        """Room on the device for a plan: the GPU budget less the baseline, what the GPU holds now
        (kept bases, the caching allocator's live blocks, measured) and the slack."""
        gpu_held = max(0, int(torch.cuda.memory_allocated()) - self.gpu_allocated0) if device.startswith("cuda") else 0
        return self.max_gpu - self.gpu_baseline - gpu_held - GPU_SLACK

    def stack_fits(self, m: int, n: int, q: int, r: int, dtype: str, k: int, retained: int, device: str) -> bool:
        """Whether k matrices of one shape fit, factored together in core on `device`: the widened
        stack, one stored-dtype matrix read at a time, the batched panels, and the k - 1 bases kept for
        their turn (on the device where they are computed there, and their host copies)."""
        panels = panel_bytes(m, n, q, r)
        native = stored_bytes(dtype)
        basis = F32 * (m + n) * r
        room = self.host_room() - self.held_now(retained)
        if device != "cpu":
            gpu_room = self._gpu_room(device)
            return k * (F32 * m * n + panels) + native * m * n + (k - 1) * basis <= gpu_room and k * basis <= room
        return k * (F32 * m * n + panels) + native * min(m, 1024) * n + (k - 1) * basis <= room

    def _least_room(self, m: int, n: int, q: int, r: int, dtype: str) -> int:
        """The smallest room in which _choose finds a plan for this matrix (on the budget's device)."""
        panels = panel_bytes(m, n, q, r)
        native = stored_bytes(dtype)
        per_row = (F32 + native) * n
        least = min(F32 * m * n + native * min(m, 1024) * n + panels, panels + per_row * MIN_BLOCK_ROWS)
        if self.device != "cpu" and self._choose(m, n, q, r, dtype, F32 * (m + n) * r, self.device) is not None:
            least = min(least, F32 * (m + n) * r)
        return least

    def smallest_for(self, matrices: list[RunMatrix], creep: int = 0) -> int:
        """The smallest --max-memory under which the planner fits every matrix of a run, each beside
        the bases held at its point (plus `creep` bytes measured past the allowance, if any). The
        one figure `plan`, `transfer` and every refusal name: the slack and the creep allowance the
        planner reserves are in it, so a run at this budget plans every matrix and one below it is
        refused."""
        return self.named_baseline() + self.smallest_working(matrices, creep)

    def smallest_working(self, matrices: list[RunMatrix], creep: int = 0) -> int:
        """The working part of smallest_for: the same in every process, whatever its baseline."""
        worst = max((held + self._least_room(m, n, q, r, dtype) for m, n, q, r, dtype, held in matrices), default=0)
        return SLACK + CREEP + creep + worst

    def refusal(self, m: int, n: int, q: int, r: int, dtype: str, retained: int) -> str:
        """The message of a budget too small for the run (for the matrix alone when the run's list is unknown)."""
        run = self.run_matrices or [(m, n, q, r, dtype, retained)]
        crept = 0
        if self.smallest_for(run) <= self.limit:  # the process crept past the allowance: name what the measured figure needs
            crept = max(0, host_anon_bytes() - self.baseline - CREEP - retained)
        need, working = self.smallest_for(run, crept), self.smallest_working(run, crept)
        what = "leaves no room for this transfer" if self.max_host <= SLACK + CREEP else "is too small for this transfer"
        return (
            f"--max-memory {size_at_most(self.limit)} {what} (a {m} x {n} matrix at q={q} does not fit): "
            f"the smallest budget that works is {size_at_least(need)} for the whole process "
            f"({format_size(self.baseline)} held for Python and torch before any work, "
            f"+ {format_size(BASELINE_MARGIN)} margin, + {size_at_least(working)} working)"
        )

    def fits_host(self, nbytes: int, retained: int = 0) -> bool:
        """Whether nbytes more of host memory fit the budget beside what is held now."""
        return nbytes <= self.host_room() - self.held_now(retained)

    # ---- watching -------------------------------------------------------------------------
    def start(self, interval: float = 0.01) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(interval,), name="crosslora-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()

    def sample(self) -> None:
        now, mapped = host_resident()
        if mapped > self.peak_file:
            self.peak_file = mapped
        if now > self.peak_host:
            self.peak_host = now
        # A budget the baseline alone fills is not "crossed" by the work: the planner refuses it,
        # naming the smallest budget, before any work is planned into it.
        if now > self.limit and self.max_host > 0 and self.exceeded is None:
            self.exceeded = (
                f"the process's private memory reached {format_size(now)} ({format_size(self.baseline)} baseline + "
                f"{format_size(now - self.baseline)} working), over the --max-memory budget of {format_size(self.limit)}"
            )
        if self.device.startswith("cuda") and torch.cuda.is_available():
            g = self.gpu_context + int(torch.cuda.max_memory_reserved())
            self.peak_gpu = max(self.peak_gpu, g)
            if self.max_gpu and g > self.max_gpu and self.exceeded is None:
                self.exceeded = f"GPU memory reached {format_size(g)}, over the --max-gpu-memory budget of {format_size(self.max_gpu)}"

    @property
    def peak_working(self) -> int:
        return max(0, self.peak_host - self.baseline)

    def _watch(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(interval)

    def check(self) -> None:
        """Raise BudgetError if the sampler saw the budget crossed."""
        if self.exceeded is not None:
            raise BudgetError(self.exceeded + "; finished units are kept: rerun with --resume and a larger budget")


def _size_rounded(n: int, up: bool) -> str:
    for unit, scale in (("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3)):
        if n < 1000 * scale or unit == "GiB":
            tenths = n / scale * 10
            return f"{(math.ceil(tenths) if up else math.floor(tenths)) / 10:.1f} {unit}"
    raise AssertionError("unreachable")


def size_at_least(n: int) -> str:
    """A size for people rounded up, so that the figure printed (and typed back) is never below n."""
    return _size_rounded(n, up=True)


def size_at_most(n: int) -> str:
    """A size for people rounded down: a refused budget never prints as the figure named beside it."""
    return _size_rounded(n, up=False)
