"""A hard memory limit for one benchmark child process: a Linux memory cgroup that charges the page
cache too, so the mapped model weights count as they do on a machine with that much memory.

`--max-memory` bounds refine's private memory; the weights it maps are file-backed pages the kernel may
drop and read again. What a user with a 2 GB machine (or a 2 GB container) wants to know is whether the
whole run fits there, and at what speed. A cgroup answers it: anonymous and file pages together stay
under the limit (file pages are reclaimed first; the process is killed only if its private memory alone
does not fit). The files the run reads are evicted from the page cache first (posix_fadvise
DONTNEED), so the run is charged for reading them, as on a machine that has not read them yet.

cgroup v2 (memory.max, memory.peak) or v1 (memory.limit_in_bytes, memory.max_usage_in_bytes); needs
root. Used by bench/refine_cost.py (`--memory-limit`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class MemoryLimit:
    """A memory cgroup of `limit` bytes for one child process (its `enter` is the child's preexec_fn)."""

    def __init__(self, limit: int, name: str) -> None:
        controllers = ROOT / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            self.v2, base = True, ROOT
        elif (ROOT / "memory" / "cgroup.procs").exists():
            self.v2, base = False, ROOT / "memory"
        else:
            raise SystemExit("--memory-limit needs a Linux memory cgroup controller (cgroup v1 or v2)")
        self.path = base / f"lowmem-crosslora-{name}-{os.getpid()}"
        try:
            self.path.mkdir()
            self._write("memory.max" if self.v2 else "memory.limit_in_bytes", limit)
            if self.v2 and (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", 0)  # no swap past the limit
            if not self.v2 and (self.path / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", limit)
        except OSError as e:
            raise SystemExit(f"--memory-limit: cannot make a memory cgroup at {self.path}: {e.strerror} (root needed)") from None

    def _write(self, name: str, value: int) -> None:
        (self.path / name).write_text(f"{value}\n")

    def enter(self) -> None:
        """Move the calling process (the child, before it execs) into the cgroup."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def peak(self) -> int | None:
        """The most the cgroup held at once, page cache included (None where the kernel does not say)."""
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else None

    def oom_kills(self) -> int:
        """Processes the kernel killed for want of memory inside the cgroup."""
        f = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        m = re.search(r"^oom_kill (\d+)$", f.read_text(), re.M) if f.exists() else None
        return int(m.group(1)) if m else 0

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def evict(paths: list[Path]) -> int:
    """Drop the clean page-cache pages of every file under `paths` (posix_fadvise DONTNEED); returns the
    bytes of the files advised."""
    total = 0
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total
