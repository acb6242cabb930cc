"""Run state: how every long job keeps its work safe and resumes it.

A job that writes an output folder `out` works in a hidden state folder beside it,
`.<out>.<kind>-partial` (kind: "crosslora" for a transfer, "refine" for a refine), and records there a
fingerprint of everything that changes its result. A rerun with the same fingerprint resumes that
work (`claim`); another fingerprint is refused with one line, unless --restart discards the state.
Small files are written whole or not at all (`atomic_write`: a temporary file and one rename). The
finished folder is published in one rename (`publish`): an old output is moved aside first and only
removed once the new one is in place, so no interruption leaves neither. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowmem_crosslora.errors import InputError

try:  # POSIX: advisory locks on output folders; elsewhere (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

STATE_FILE = "state.json"  # a claimed state folder's fingerprint, for jobs without a journal of their own


def state_dir_for(out: Path, kind: str = "crosslora") -> Path:
    """The hidden state folder of a job writing `out`."""
    return out.parent / f".{out.name}.{kind}-partial"


def fingerprint(payload: dict[str, Any]) -> str:
    """A short stable digest of a job's inputs and result-changing options (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable; best effort where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same folder and one rename, so that a
    reader sees the old file or the whole new one; `durable` also fsyncs the file and the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


@contextmanager
def replacing(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest` for a writer that streams (a GGUF file): on success the file is
    fsynced and renamed onto `dest` in one step; on any failure it is removed and `dest` is untouched."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def write_json(path: Path, obj: Any, indent: int = 1) -> None:
    """A JSON file (sorted keys, a final newline), written atomically and durably."""
    atomic_write(path, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())


def disk_error(e: OSError, path: Path) -> InputError:
    """One line for a failed write: what failed and why, and that rerunning the command resumes."""
    where = e.filename if isinstance(e.filename, str) else path
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk is full" if e.errno != errno.EFBIG else "the file size limit was reached"
        return InputError(f"cannot write {where}: {why}; finished units are kept, free space and rerun the same command to resume")
    return InputError(f"cannot write {where}: {e.strerror or e}; finished units are kept, rerun the same command to resume")


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def inside(a: Path, b: Path) -> bool:
    """Whether path `a` lies inside `b` (or is `b`), after resolving both."""
    return _inside(resolved(a, "path"), resolved(b, "path"))


def resolved(path: Path, what: str) -> Path:
    """The absolute path with every symbolic link followed; a loop is one line, not a traceback."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise InputError(f"{what} {path} cannot be resolved ({str(e).strip() or type(e).__name__}); a symbolic link loop?") from None


def check_output_dir(out: Path, inputs: list[Path], force: bool) -> None:
    """An output folder must lie apart from the inputs and from the working directory, be a real
    folder (no symbolic link: publishing renames it), and be absent or empty unless --force."""
    if out.is_symlink():
        raise InputError(f"output {out} is a symbolic link; give the folder itself (publishing replaces the output by a rename)")
    o = resolved(out, "output")
    if _inside(Path.cwd().resolve(), o):
        raise InputError(f"output folder {out} holds the working directory; choose a folder of its own")
    for p in inputs:
        q = resolved(p, "input")
        if _inside(o, q):
            raise InputError(f"output folder {out} lies inside the input {p}; choose a folder outside the inputs")
        if _inside(q, o):
            raise InputError(f"the input {p} lies inside the output folder {out}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"output folder {out} is not empty; use --force to replace it")


def check_report_path(report: Path | None, inputs: list[Path]) -> None:
    """A --report file is checked before any work: not a folder, not one of the inputs nor inside an
    input folder, in a folder that exists and can be written."""
    if report is None:
        return
    r = resolved(report, "--report")
    if r.is_dir():
        raise InputError(f"--report {report} is a folder; give a file name")
    for p in inputs:
        q = resolved(p, "input")
        if r == q or _inside(r, q):
            raise InputError(f"--report {report} would write into the input {p}; choose a file elsewhere")
    if not r.parent.is_dir():
        raise InputError(f"--report {report}: the folder {r.parent} does not exist")
    if not os.access(r.parent, os.W_OK) or (r.exists() and not os.access(r, os.W_OK)):
        raise InputError(f"--report {report} cannot be written (permission denied)")


def refuse_other_run(state: Path, what: str, old: str | None, new: str, detail: str = "") -> None:
    """The one check of an interrupted run: state made with another fingerprint is never mixed in."""
    if old is not None and old != new:
        raise InputError(
            f"an interrupted {what} in {state} was made with other inputs or options{detail}; "
            "rerun it with the same ones to resume, or pass --restart to start over"
        )


def claim(state: Path, fp: str, restart: bool, what: str, record: dict[str, Any], state_file: str = STATE_FILE) -> bool:
    """Take the state folder for a job of fingerprint `fp`: discard it first on --restart, refuse it
    when another run's, else create it and record the fingerprint (with `record`). True: resumed."""
    if state.exists() and restart:
        shutil.rmtree(state)
    resumed = state.exists()
    if resumed:
        try:
            old = json.loads((state / state_file).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            old = ""
        refuse_other_run(state, what, old, fp)
    state.mkdir(parents=True, exist_ok=True)
    write_json(state / state_file, {"fingerprint": fp, **record})
    return resumed


def publish(staged: Path, out: Path, force: bool) -> None:
    """Move the finished folder `staged` to `out` in one rename. A non-empty `out` needs `force`; it is
    moved aside first and removed only once the new folder is in place."""
    fsync_dir(staged)
    old = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
            if not force:
                raise InputError(f"output folder {out} is not empty; use --force to replace it")
            old = out.parent / f".{out.name}.crosslora-old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        elif out.is_dir() and not out.is_symlink():
            out.rmdir()
        else:
            if not force:
                raise InputError(f"output {out} exists and is not a folder")
            out.unlink()
    os.replace(staged, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class OutputLock:
    """An exclusive lock on one output while a job writes it (see lock_output); `release` ends it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        """Remove the lock file, then unlock (a waiter that opened the old file sees it is gone)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def lock_output(out: Path, kind: str, what: str) -> OutputLock:
    """Take the exclusive lock of a job writing `out`: `.<out>.<kind>-lock` beside it (outside the
    state folder, which a restart deletes), held with flock until `release` or the process's end, so
    a killed run leaves no lock behind. A second job on the same output is refused with one line
    naming the holder's process id; jobs on other outputs (sharing the basis cache) are not affected."""
    path = out.parent / f".{out.name}.{kind}-lock"
    if fcntl is None:
        return OutputLock(path, None)
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise disk_error(e, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(
                f"another {what} (process {holder}) is writing {out}; wait for it to finish, or stop it and rerun this command to resume"
            ) from None
        try:  # the last holder may have removed the file between our open and our lock: lock the live one
            live = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            live = False
        if live:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return OutputLock(path, fd)
