"""This process's memory as the kernel counts it (private vs file-backed), and the allocator's tuning."""

from __future__ import annotations

import ctypes
import sys

import psutil


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_resident(pid: int | str = "self") -> tuple[int, int]:
    """(private, file-backed) resident bytes of a process (this one by default)."""
    anon = file = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    if anon is None:
        return (host_anon_bytes(), 0) if pid == "self" else (0, 0)
    return anon, file or 0


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


_LIBC: ctypes.CDLL | None = None


def tune_allocator(mapped_from: int = 256 << 10, trim_above: int = 256 << 10) -> None:
    """Make glibc return freed memory to the OS promptly, so the measured figure tracks live data:
    blocks of `mapped_from` bytes or more get their own mapping (M_MMAP_THRESHOLD), free heap tops
    above `trim_above` go back (M_TRIM_THRESHOLD). Every command keeps the defaults.

    They have a price: a block reused after it was returned is faulted in again, page by page. In a
    refine training step on the 0.5B target that is 2-3 million page faults and 6-10 s of system CPU
    time; keeping freed blocks in the heap instead (32 MiB, 64 MiB) made the step 0.66-0.88x as long
    but its peak private memory 2-6x, the heap's fragmentation (docs/BENCHMARKS.md, "The allocator's
    page faults"). The budget is the promise, so the defaults stay."""
    global _LIBC
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, mapped_from)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, trim_above)  # M_TRIM_THRESHOLD
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim); a no-op elsewhere."""
    if _LIBC is not None:
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:
            pass
