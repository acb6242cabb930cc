"""The memory budget: one object owns the numbers.

Host memory means this process's *anonymous* resident memory (Linux: RssAnon in
/proc/self/status; elsewhere psutil's USS). Pages of the memory-mapped checkpoints are file-backed:
the kernel can drop them at any time and re-read them from disk, so they are reported apart
(RssFile) and do not count against --max-memory. GPU memory is torch's allocated peak.

Before each matrix the budget picks how to factor it (device, in-core or blocked, block size) from
a memory model; while running, a sampler thread watches the real figure and the engine stops
cleanly, keeping finished units, if the budget is crossed.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from .errors import BudgetError
from .sizes import format_size

F32 = 4
# Headroom kept for allocator slack, Python objects and the writer's buffers.
SLACK = 48 * 1024**2
MIN_BLOCK_ROWS = 16


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_anon_bytes() -> int:
    """Private (anonymous) resident memory of this process, in bytes."""
    v = _status_kib("RssAnon")
    if v is not None:
        return v
    try:
        return int(psutil.Process().memory_full_info().uss)
    except (psutil.Error, AttributeError):
        return int(psutil.Process().memory_info().rss)


def host_file_bytes() -> int:
    """File-backed resident memory (mapped checkpoint pages, shared libraries): reclaimable."""
    return _status_kib("RssFile") or 0


def tune_allocator() -> None:
    """Make glibc return large freed blocks to the OS at once, so the measured figure tracks live data."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks >= 1 MiB get their own mapping
            libc.mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD
        except OSError:
            pass


@dataclass(frozen=True)
class MatrixPlan:
    """How one base matrix is factored."""

    device: str
    mode: str  # "in-core" or "blocked"
    block_rows: int
    host_bytes: int  # modelled extra host memory
    gpu_bytes: int  # modelled GPU memory


def panel_bytes(m: int, n: int, q: int, r: int) -> int:
    """The range finder's panels and the result: Y/Q (m x q), Z (n x q), QR work, U/V (r cols)."""
    return F32 * (3 * m * q + 3 * n * q + 2 * q * q + (m + n) * r)


def stored_bytes(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype, 4)


class Budget:
    def __init__(self, max_host: int | None = None, max_gpu: int | None = None, device: str = "cpu") -> None:
        self.device = device
        self.baseline = host_anon_bytes()
        if max_host is None:
            max_host = int(self.baseline + 0.5 * psutil.virtual_memory().available)
            self.host_default = True
        else:
            self.host_default = False
        self.max_host = int(max_host)
        if device.startswith("cuda") and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            self.max_gpu = int(max_gpu) if max_gpu is not None else int(0.8 * free)
        else:
            self.max_gpu = int(max_gpu) if max_gpu is not None else 0
        self.peak_host = self.baseline
        self.peak_gpu = 0
        self.exceeded: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- planning -------------------------------------------------------------------------
    def host_room(self) -> int:
        return self.max_host - self.baseline - SLACK

    def plan_matrix(self, m: int, n: int, q: int, r: int, dtype: str, retained: int = 0, prefer_device: str | None = None) -> MatrixPlan:
        """Pick device, in-core or blocked, and block size for one m x n matrix; BudgetError if none fits.

        `retained` is memory already held for the unit (the other model's basis).
        """
        device = prefer_device or self.device
        panels = panel_bytes(m, n, q, r)
        native = stored_bytes(dtype)
        room = self.host_room() - retained
        if device != "cpu":
            gpu_room = self.max_gpu
            # GPU: host keeps only a native block in flight plus the result copied back.
            host_gpu = native * min(m, 4096) * n + F32 * (m + n) * r
            if F32 * m * n + panels <= gpu_room and host_gpu <= room:
                return MatrixPlan(device, "in-core", m, host_gpu, F32 * m * n + panels)
            per_row = F32 * n
            rows = (gpu_room - panels) // per_row if gpu_room > panels else 0
            if rows >= MIN_BLOCK_ROWS and native * rows * n <= room:
                rows = int(min(rows, m))
                return MatrixPlan(device, "blocked", rows, native * rows * n + F32 * (m + n) * r, F32 * rows * n + panels)
        # CPU: in-core holds the widened matrix; blocked holds one native block and its widened copy.
        if F32 * m * n + native * min(m, 1024) * n + panels <= room:
            return MatrixPlan("cpu", "in-core", m, F32 * m * n + panels, 0)
        per_row = (F32 + native) * n
        rows = (room - panels) // per_row if room > panels else 0
        if rows >= MIN_BLOCK_ROWS:
            rows = int(min(rows, m))
            return MatrixPlan("cpu", "blocked", rows, per_row * rows + panels, 0)
        need = self.baseline + SLACK + retained + panels + per_row * MIN_BLOCK_ROWS
        raise BudgetError(
            f"--max-memory {format_size(self.max_host)} is too small for a {m} x {n} matrix at q={q}: "
            f"the smallest budget that works is {format_size(need)} (this process already holds {format_size(self.baseline)})"
        )

    def minimum_host(self, shapes: list[tuple[int, int, int, int]]) -> int:
        """The smallest --max-memory under which every (m, n, q, r) matrix can be factored (blocked)."""
        worst = 0
        for m, n, q, r in shapes:
            per_row = (F32 + 2) * n
            worst = max(worst, panel_bytes(m, n, q, r) + per_row * MIN_BLOCK_ROWS + F32 * (m + n) * r)
        return self.baseline + SLACK + worst

    # ---- watching -------------------------------------------------------------------------
    def start(self, interval: float = 0.005) -> None:
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
        now = host_anon_bytes()
        if now > self.peak_host:
            self.peak_host = now
        if now > self.max_host and self.exceeded is None:
            self.exceeded = f"host memory reached {format_size(now)}, over the --max-memory budget of {format_size(self.max_host)}"
        if self.device.startswith("cuda") and torch.cuda.is_available():
            g = int(torch.cuda.max_memory_allocated())
            self.peak_gpu = max(self.peak_gpu, g)
            if self.max_gpu and g > self.max_gpu and self.exceeded is None:
                self.exceeded = f"GPU memory reached {format_size(g)}, over the --max-gpu-memory budget of {format_size(self.max_gpu)}"

    def _watch(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(interval)

    def check(self) -> None:
        """Raise BudgetError if the sampler saw the budget crossed."""
        if self.exceeded is not None:
            raise BudgetError(self.exceeded + "; finished units are kept: rerun with --resume and a larger budget")
