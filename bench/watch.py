"""Peak private memory of a command's whole process tree, measured from outside it.

What a user on a small box compares --max-memory with: the kernel's count of each process's
private resident pages (RssAnon in /proc/PID/status; file-backed pages of memory-mapped checkpoints
are reclaimable and not counted), summed over the process and its descendants, sampled every few
milliseconds by this process, never by the process measured.

    python -m bench.watch -- lowmem-crosslora transfer ...   # prints the peak, exits as the command did
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import psutil

from bench.crash import child_env


def _proc_kib(path: str, key: str) -> int | None:
    """The `key:` line of a /proc file, in bytes (it counts kB); None where the file or the line is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_anon(pid: int) -> int:
    """Private resident bytes of one process (0 once it is gone)."""
    return _proc_kib(f"/proc/{pid}/status", "RssAnon") or 0


def pss_anon(pid: int) -> int:
    """A process's share of the anonymous pages it maps (Pss_Anon in /proc/PID/smaps_rollup): a page
    shared copy-on-write with a forked child counts half in each; RssAnon where the kernel has no
    Pss_Anon (0 once the process is gone)."""
    v = _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss_Anon")
    return rss_anon(pid) if v is None else v


def tree_private(pid: int) -> int:
    """Private resident bytes of a process and all its descendants, now. A process alone: its RssAnon.
    With children: each one's proportional share (pss_anon). A child forked to run a command (the
    `ldconfig -p` of ctypes.util.find_library, which an import of httpx's trio backend runs) maps all
    of its parent's pages until it execs, so RssAnon would count them twice: a 300 MB run read as
    344 MB for the instant of the fork, in the tests of --max-memory, though no page was copied."""
    try:
        kids = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        kids = []
    if not kids:
        return rss_anon(pid)
    return pss_anon(pid) + sum(pss_anon(k) for k in kids)


@dataclass
class Watched:
    returncode: int
    stdout: str
    stderr: str
    peak_private: int  # bytes, whole tree
    samples: int


def run_watched(args: list[str], *, timeout: float = 600, interval: float = 0.002, env: dict[str, str] | None = None) -> Watched:
    """Run ARGS (environment: bench.crash.child_env()), sampling its tree's private memory until it exits."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env or child_env())
        peak, samples = 0, 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, samples
            while not stop.is_set() and proc.poll() is None:
                peak = max(peak, tree_private(proc.pid))
                samples += 1
                time.sleep(interval)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            stop.set()
            t.join()
        out.seek(0)
        err.seek(0)
        return Watched(proc.returncode, out.read(), err.read(), peak, samples)


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m bench.watch -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    w = run_watched(args)
    sys.stdout.write(w.stdout)
    sys.stderr.write(w.stderr)
    print(f"peak private memory of the process tree: {w.peak_private / 2**20:.1f} MiB ({w.samples} samples)", file=sys.stderr)
    return w.returncode


if __name__ == "__main__":
    sys.exit(main())
