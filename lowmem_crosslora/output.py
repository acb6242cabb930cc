"""The output folder, written so that no work is lost and nothing half-done carries a final name.

The whole output is built in a hidden sibling folder, `.<OUT>.crosslora-partial/`. Its
`adapter_model.safetensors.partial` is laid out up front (header first: every name, shape, dtype and
offset is known once the plan exists); each unit's bytes go to their offsets as the unit finishes,
are fsynced, then recorded in `journal.jsonl` with a checksum. Resume re-reads the journal, checks
each recorded unit against the bytes on disk, and redoes whatever does not match. Finishing
verifies every checksum, writes adapter_config.json and the report beside the adapter, fsyncs, and
renames the folder into place in one step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import InputError

DTYPE_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
PARTIAL_NAME = "adapter_model.safetensors.partial"
JOURNAL_NAME = "journal.jsonl"
ADAPTER_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
REPORT_NAME = "crosslora_report.json"
JOURNAL_VERSION = 1


def _test_hook(point: str, unit_index: int) -> None:
    """Test-only: LOWMEM_CROSSLORA_TEST_KILL='point:k' SIGKILLs this process at that point of unit k."""
    spec = os.environ.get("LOWMEM_CROSSLORA_TEST_KILL")
    if spec and spec == f"{point}:{unit_index}":
        os.kill(os.getpid(), signal.SIGKILL)


def state_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.crosslora-partial"


def disk_error(e: OSError, path: Path) -> InputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk is full" if e.errno != errno.EFBIG else "the file size limit was reached"
        return InputError(f"cannot write {path}: {why}; finished units are kept, free space and rerun the same command to resume")
    return InputError(f"cannot write {path}: {e.strerror or e}; finished units are kept, rerun the same command to resume")


class Layout:
    """A safetensors file's header and the byte range of every tensor, fixed before any data exists."""

    def __init__(self, entries: Iterable[tuple[str, str, tuple[int, int]]], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.dtypes: dict[str, str] = {}
        offset = 0
        for name, dtype, shape in entries:
            size = DTYPE_BYTES[dtype] * shape[0] * shape[1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.ranges[name] = (offset, offset + size)
            self.shapes[name] = shape
            self.dtypes[name] = dtype
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header_bytes = struct.pack("<Q", len(raw)) + raw
        self.data_start = len(self.header_bytes)
        self.total = self.data_start + offset
        self.digest = hashlib.sha256(self.header_bytes).hexdigest()

    def span(self, name: str) -> tuple[int, int]:
        b, e = self.ranges[name]
        return self.data_start + b, self.data_start + e


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _fsync_dir(path: Path) -> None:
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


def _line_check(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class PartialOutput:
    """The hidden state folder of one transfer: partial adapter file plus journal."""

    def __init__(self, out: Path, layout: Layout, fingerprint: str, resume: bool) -> None:
        self.out = out
        self.dir = state_dir_for(out)
        self.layout = layout
        self.fingerprint = fingerprint
        self.partial = self.dir / PARTIAL_NAME
        self.journal_path = self.dir / JOURNAL_NAME
        self.done: dict[str, dict[str, Any]] = {}  # uid -> journal record
        self.redone_corrupt: list[str] = []
        self._fd: int | None = None
        self._journal = None
        self.resumed = False
        self._open(resume)

    # ---- setup ----------------------------------------------------------------------------
    def _open(self, resume: bool) -> None:
        try:
            if self.dir.exists() and resume and self._load_existing():
                self.resumed = True
            else:
                if self.dir.exists():
                    shutil.rmtree(self.dir)
                self.dir.mkdir(parents=True)
                self._create()
            self._fd = os.open(self.partial, os.O_RDWR)
            self._journal = open(self.journal_path, "a", encoding="utf-8")
        except OSError as e:
            raise disk_error(e, self.dir) from None

    def _create(self) -> None:
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.layout.total)
            os.pwrite(fd, self.layout.header_bytes, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(self.journal_path, "w", encoding="utf-8") as j:
            head = {"kind": "header", "version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "layout": self.layout.digest}
            head["check"] = _line_check(head)
            j.write(json.dumps(head, sort_keys=True) + "\n")
            j.flush()
            os.fsync(j.fileno())
        _fsync_dir(self.dir)

    def read_journal(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        head = None
        units: list[dict[str, Any]] = []
        try:
            text = self.journal_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None, []
        for i, line in enumerate(text.splitlines()):
            try:
                rec = json.loads(line)
                check = rec.pop("check")
            except (json.JSONDecodeError, AttributeError, KeyError):
                continue  # a torn or tampered line: its unit is redone
            if not isinstance(rec, dict) or _line_check(rec) != check:
                continue
            if i == 0 and rec.get("kind") == "header":
                head = rec
            elif rec.get("kind") == "unit":
                units.append(rec)
        return head, units

    def existing_fingerprint(self) -> str | None:
        head, _ = self.read_journal()
        return head.get("fingerprint") if head else None

    def _load_existing(self) -> bool:
        """Adopt an earlier run's state if its header and layout match; return False to start over."""
        head, units = self.read_journal()
        if head is None or head.get("version") != JOURNAL_VERSION or head.get("layout") != self.layout.digest:
            return False
        if head.get("fingerprint") != self.fingerprint:
            return False
        try:
            if self.partial.stat().st_size != self.layout.total:
                return False
            with open(self.partial, "rb") as f:
                if f.read(self.layout.data_start) != self.layout.header_bytes:
                    return False
                for rec in units:
                    if self._verify(f, rec):
                        self.done[rec["uid"]] = rec
                    else:
                        self.redone_corrupt.append(rec.get("uid", "?"))
        except OSError:
            return False
        return True

    def _verify(self, f: Any, rec: dict[str, Any]) -> bool:
        h = hashlib.sha256()
        for name in rec.get("tensors", []):
            if name not in self.layout.ranges:
                return False
            b, e = self.layout.span(name)
            f.seek(b)
            data = f.read(e - b)
            if len(data) != e - b:
                return False
            h.update(data)
        return bool(rec.get("tensors")) and h.hexdigest() == rec.get("sha256")

    # ---- writing --------------------------------------------------------------------------
    def write_unit(self, index: int, uid: str, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """Write a unit's tensors at their offsets, make them durable, then journal them."""
        assert self._fd is not None and self._journal is not None
        h = hashlib.sha256()
        names = sorted(tensors)
        try:
            for name in names:
                t = tensors[name]
                if tuple(t.shape) != self.layout.shapes[name] or t.dtype != DTYPE_TORCH[self.layout.dtypes[name]]:
                    raise AssertionError(f"tensor {name} does not match the planned layout")
                data = tensor_bytes(t)
                b, e = self.layout.span(name)
                assert len(data) == e - b
                h.update(data)
                half = len(data) // 2
                os.pwrite(self._fd, data[:half], b)
                _test_hook("mid_write", index)
                os.pwrite(self._fd, data[half:], b + half)
            os.fsync(self._fd)
            _test_hook("before_journal", index)
            rec = {"kind": "unit", "uid": uid, "tensors": names, "sha256": h.hexdigest(), "record": record}
            rec["check"] = _line_check({k: v for k, v in rec.items()})
            self._journal.write(json.dumps(rec, sort_keys=True) + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as e:
            raise disk_error(e, self.partial) from None
        rec.pop("check")
        self.done[uid] = rec
        _test_hook("after_unit", index)

    # ---- finishing ------------------------------------------------------------------------
    def verify_all(self, expected: list[str]) -> list[str]:
        """Uids whose bytes on disk do not match their journal checksum (or are missing)."""
        bad = []
        with open(self.partial, "rb") as f:
            for uid in expected:
                rec = self.done.get(uid)
                if rec is None or not self._verify(f, rec):
                    bad.append(uid)
        return bad

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def finish(self, config: dict[str, Any], report: dict[str, Any], force: bool) -> None:
        """Write the side files, then move the whole folder to its final name in one rename."""
        self.close()
        try:
            for name, payload in ((CONFIG_NAME, config), (REPORT_NAME, report)):
                tmp = self.dir / (name + ".tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(payload, f, indent=2, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.dir / name)
            os.replace(self.partial, self.dir / ADAPTER_NAME)
            self.journal_path.unlink()
            _fsync_dir(self.dir)
            old = None
            if self.out.exists():
                if any(self.out.iterdir()):
                    if not force:
                        raise InputError(f"output folder {self.out} is not empty; use --force to replace it")
                    old = self.out.parent / f".{self.out.name}.crosslora-old"
                    if old.exists():
                        shutil.rmtree(old)
                    os.replace(self.out, old)
                else:
                    self.out.rmdir()
            os.replace(self.dir, self.out)
            _fsync_dir(self.out.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise disk_error(e, self.out) from None
