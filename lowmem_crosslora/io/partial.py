"""The output folder, written so that no work is lost and nothing half-done carries a final name.

The whole output is built in a hidden sibling folder, `.<OUT>.crosslora-partial/`. Its
`adapter_model.safetensors.partial` is laid out up front (header first: every name, shape, dtype and
offset is known once the plan exists); each unit's bytes go to their offsets as the unit finishes,
are fsynced, then recorded in `journal.jsonl` with a checksum. Resume re-reads the journal, checks
each recorded unit against the bytes on disk, and redoes whatever does not match. Finishing
verifies every checksum, writes adapter_config.json and the report beside the adapter, fsyncs, and
renames the folder into place in one step."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora import hooks
from lowmem_crosslora.dtypes import TAG_BYTES, TAG_TORCH
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.runstate import atomic_write, disk_error, publish, state_dir_for, write_json

PARTIAL_NAME = "adapter_model.safetensors.partial"


JOURNAL_NAME = "journal.jsonl"


ADAPTER_NAME = "adapter_model.safetensors"


CONFIG_NAME = "adapter_config.json"


REPORT_NAME = "crosslora_report.json"


JOURNAL_VERSION = 1


SYNC_INTERVAL = 1.0  # seconds between fsyncs of the partial file and the journal


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite every byte: a short write (a file size limit, a nearly full disk) is retried, so that
    the error that stops it is raised instead of being silently dropped."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


class Layout:
    """A safetensors file's header and the byte range of every tensor, fixed before any data exists.

    `regions` names some rows of a tensor (region name -> (tensor, row ranges)): a unit that fills
    only part of a tensor (one part of a fused module) writes and journals its region, whose rows
    need not be contiguous."""

    def __init__(
        self,
        entries: Iterable[tuple[str, str, tuple[int, int]]],
        metadata: dict[str, str] | None = None,
        regions: dict[str, tuple[str, tuple[tuple[int, int], ...]]] | None = None,
    ) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.dtypes: dict[str, str] = {}
        offset = 0
        for name, dtype, shape in entries:
            size = TAG_BYTES[dtype] * shape[0] * shape[1]
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
        # region name -> byte spans (relative to the data), in row order
        self.region_spans: dict[str, list[tuple[int, int]]] = {}
        for region, (tensor, rows) in sorted((regions or {}).items()):
            b0, _ = self.ranges[tensor]
            cols = self.shapes[tensor][1]
            row_bytes = TAG_BYTES[self.dtypes[tensor]] * cols
            self.region_spans[region] = [(b0 + a * row_bytes, b0 + e * row_bytes) for a, e in rows]
            self.ranges[region] = (self.region_spans[region][0][0], self.region_spans[region][-1][1])
            self.shapes[region] = (sum(e - a for a, e in rows), cols)
            self.dtypes[region] = self.dtypes[tensor]
        if self.region_spans:
            self.digest = hashlib.sha256(self.header_bytes + json.dumps(sorted(self.region_spans.items())).encode()).hexdigest()

    def span(self, name: str) -> tuple[int, int]:
        b, e = self.ranges[name]
        return self.data_start + b, self.data_start + e

    def spans(self, name: str) -> list[tuple[int, int]]:
        """The absolute byte spans of a tensor (one) or of a region (one per row range)."""
        if name in self.region_spans:
            return [(self.data_start + b, self.data_start + e) for b, e in self.region_spans[name]]
        return [self.span(name)]


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _line_check(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _journal_line(record: dict[str, Any]) -> bytes:
    rec = {k: v for k, v in record.items() if k != "check"}
    rec["check"] = _line_check(rec)
    return (json.dumps(rec, sort_keys=True) + "\n").encode()


def journal_fingerprint(out: Path) -> str | None:
    """The run fingerprint an interrupted transfer into `out` recorded, or None if there is no usable state."""
    probe = PartialOutput.__new__(PartialOutput)
    probe.journal_path = state_dir_for(out) / JOURNAL_NAME
    head, _ = probe.read_journal()
    fp = head.get("fingerprint") if head else None
    return fp if isinstance(fp, str) else None


class PartialOutput:
    """The hidden state folder of one transfer: partial adapter file plus journal.

    `expected` maps each planned unit id to its tensor names; a journal line that claims other
    tensors for a unit (or names a unit the plan does not have) is not trusted.
    """

    def __init__(self, out: Path, layout: Layout, fingerprint: str, resume: bool, expected: dict[str, list[str]] | None = None) -> None:
        self.out = out
        self.dir = state_dir_for(out)
        self.layout = layout
        self.fingerprint = fingerprint
        self.expected = None if expected is None else {uid: sorted(names) for uid, names in expected.items()}
        self.partial = self.dir / PARTIAL_NAME
        self.journal_path = self.dir / JOURNAL_NAME
        self.done: dict[str, dict[str, Any]] = {}  # uid -> journal record
        self.redone_corrupt: list[str] = []  # journaled units whose bytes on disk did not match: redone
        self.bad_lines = 0  # torn or tampered journal lines: not trusted
        self.repairs: list[str] = []  # what resuming had to fix in the partial file
        self._fd: int | None = None
        self._jfd: int | None = None
        self._last_sync = time.monotonic()
        self.resumed = False
        self._open(resume)

    # ---- setup ----------------------------------------------------------------------------
    def _open(self, resume: bool) -> None:
        try:
            # An OSError while adopting the old state is raised as it is: the state stays for a retry.
            if self.dir.exists() and resume and self._load_existing():
                self.resumed = True
            else:
                if self.dir.exists():
                    shutil.rmtree(self.dir)
                self.dir.mkdir(parents=True)
                self._create()
            self._fd = os.open(self.partial, os.O_RDWR)
            self._jfd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            self.close()
            raise disk_error(e, self.dir) from None

    def _create(self) -> None:
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.layout.total)
            _pwrite_all(fd, self.layout.header_bytes, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        head = {"kind": "header", "version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "layout": self.layout.digest}
        self._write_journal_file(_journal_line(head))

    def _write_journal_file(self, data: bytes) -> None:
        """Replace the journal in one rename (a new run's header, or a compacted journal on resume)."""
        atomic_write(self.journal_path, data)

    def read_journal(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The header and the unit records whose line check holds; anything else is skipped (counted in bad_lines)."""
        head = None
        units: list[dict[str, Any]] = []
        bad = 0
        try:
            raw = self.journal_path.read_bytes()
        except OSError:
            return None, []
        for i, line in enumerate(raw.split(b"\n")):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("check"), str):
                bad += 1  # a torn or tampered line: its unit is redone
                continue
            check = rec.pop("check")
            if _line_check(rec) != check:
                bad += 1
                continue
            if i == 0 and rec.get("kind") == "header":
                head = rec
            elif (
                i > 0
                and rec.get("kind") == "unit"
                and isinstance(rec.get("uid"), str)
                and isinstance(rec.get("tensors"), list)
                and isinstance(rec.get("sha256"), str)
                and isinstance(rec.get("record"), dict)
            ):
                units.append(rec)
            else:
                bad += 1
        self.bad_lines = bad
        return head, units

    def existing_fingerprint(self) -> str | None:
        head, _ = self.read_journal()
        return head.get("fingerprint") if head else None

    def _load_existing(self) -> bool:
        """Adopt an earlier run's state if its header matches; return False to start over.

        The partial file is repaired in place (a wrong size is set right, a damaged header is
        rewritten) and every journaled unit is checked against its bytes: those that match are
        kept, the rest are redone. The journal is then rewritten to hold exactly the kept units, so
        that a torn last line never swallows the lines appended after it.
        """
        raw_before = self.journal_path.read_bytes() if self.journal_path.exists() else b""
        head, units = self.read_journal()
        if head is None or head.get("version") != JOURNAL_VERSION or head.get("layout") != self.layout.digest:
            return False
        if head.get("fingerprint") != self.fingerprint:
            return False
        if not self.partial.exists():
            finished = self.dir / ADAPTER_NAME
            if not finished.exists():
                return False
            os.replace(finished, self.partial)  # stopped while finishing: the file goes back and is checked again
        fd = os.open(self.partial, os.O_RDWR)
        bad: list[str] = []
        try:
            size = os.fstat(fd).st_size
            if size != self.layout.total:
                self.repairs.append(f"the partial file had {size} bytes instead of {self.layout.total}")
                os.ftruncate(fd, self.layout.total)
            if os.pread(fd, self.layout.data_start, 0) != self.layout.header_bytes:
                self.repairs.append("the partial file's header was damaged and is rewritten")
                _pwrite_all(fd, self.layout.header_bytes, 0)
            for rec in units:
                if self._verify(fd, rec):
                    self.done[rec["uid"]] = rec
                else:
                    bad.append(rec["uid"])
            if self.repairs:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.redone_corrupt = sorted(set(bad) - set(self.done))
        compact = _journal_line(head) + b"".join(_journal_line(rec) for rec in self.done.values())
        if compact != raw_before:
            self._write_journal_file(compact)
        return True

    def _verify(self, fd: int, rec: dict[str, Any]) -> bool:
        names = rec.get("tensors")
        uid = rec.get("uid")
        if not isinstance(names, list) or not names:
            return False
        if self.expected is not None and (uid not in self.expected or sorted(names) != self.expected[uid]):
            return False
        h = hashlib.sha256()
        for name in names:
            if not isinstance(name, str) or name not in self.layout.ranges:
                return False
            for b, e in self.layout.spans(name):
                data = os.pread(fd, e - b, b)
                if len(data) != e - b:
                    return False
                h.update(data)
        return h.hexdigest() == rec.get("sha256")

    # ---- writing --------------------------------------------------------------------------
    def write_unit(self, index: int, uid: str, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """Write a unit's tensors at their offsets, make them durable, then journal them."""
        assert self._fd is not None and self._jfd is not None
        h = hashlib.sha256()
        names = sorted(tensors)
        try:
            for name in names:
                t = tensors[name]
                if tuple(t.shape) != self.layout.shapes[name] or t.dtype != TAG_TORCH[self.layout.dtypes[name]]:
                    raise AssertionError(f"tensor {name} does not match the planned layout")
                data = memoryview(tensor_bytes(t))
                spans = self.layout.spans(name)
                assert len(data) == sum(e - b for b, e in spans)
                h.update(data)
                pos = 0
                for k, (b, e) in enumerate(spans):
                    chunk = data[pos : pos + e - b]
                    pos += e - b
                    half = len(chunk) // 2 if k == 0 else 0
                    _pwrite_all(self._fd, chunk[:half], b)
                    if k == 0:
                        hooks.reached("mid_write", index)
                    _pwrite_all(self._fd, chunk[half:], b + half)
            # Durability is batched: fsync at most every SYNC_INTERVAL seconds (and always at the
            # end). A kill loses nothing (the bytes are in the kernel); a power cut loses at most the
            # last interval, and since resume checks every journaled unit's bytes against its
            # checksum, a journal line that reached the disk before its data is caught and redone.
            due = time.monotonic() - self._last_sync >= SYNC_INTERVAL
            if due:
                os.fsync(self._fd)
        except OSError as e:
            raise disk_error(e, self.partial) from None
        hooks.reached("before_journal", index)
        rec = {"kind": "unit", "uid": uid, "tensors": names, "sha256": h.hexdigest(), "record": record}
        try:
            _write_all(self._jfd, _journal_line(rec))
            if due:
                os.fsync(self._jfd)
                self._last_sync = time.monotonic()
        except OSError as e:
            raise disk_error(e, self.journal_path) from None
        self.done[uid] = rec
        hooks.reached("after_unit", index)

    # ---- finishing ------------------------------------------------------------------------
    def sync(self) -> None:
        """Make every written unit and journal line durable now."""
        try:
            for fd in (self._fd, self._jfd):
                if fd is not None:
                    os.fsync(fd)
        except OSError as e:
            raise disk_error(e, self.partial) from None
        self._last_sync = time.monotonic()

    def verify_all(self, expected: list[str]) -> list[str]:
        """Uids whose bytes on disk do not match their journal checksum (or are missing)."""
        self.sync()
        bad = []
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            for uid in expected:
                rec = self.done.get(uid)
                if rec is None or not self._verify(fd, rec):
                    bad.append(uid)
        finally:
            os.close(fd)
        return bad

    def close(self) -> None:
        """Close the files; never raises (it runs on the way out of a failed write too)."""
        for attr in ("_fd", "_jfd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                setattr(self, attr, None)
                try:
                    os.fsync(fd)
                except OSError:
                    pass
                try:
                    os.close(fd)
                except OSError:
                    pass

    def finish(
        self, config: dict[str, Any], report: dict[str, Any], force: bool, extra: Callable[[Path], None] | None = None, drop: Iterable[str] = ()
    ) -> None:
        """Write the side files, then move the whole folder to its final name in one rename.

        `extra(folder)` writes further files from the finished adapter inside the state folder (the
        LoRA GGUF) before the move; the files named in `drop` are removed from it just before the move.
        """
        self.close()
        if self.out.exists() and self.out.is_dir() and any(self.out.iterdir()) and not force:
            raise InputError(f"output folder {self.out} is not empty; use --force to replace it (the finished transfer is kept for that)")
        try:
            for name, payload in ((CONFIG_NAME, config), (REPORT_NAME, report)):
                write_json(self.dir / name, payload, indent=2)
            os.replace(self.partial, self.dir / ADAPTER_NAME)
            hooks.reached("finish", 0)  # a state folder caught here is resumed: the file goes back to .partial
            if extra is not None:
                extra(self.dir)
            self.journal_path.unlink()
            for name in drop:
                (self.dir / name).unlink(missing_ok=True)
            publish(self.dir, self.out, force)  # an old output is moved aside first, removed once this is in place
        except OSError as e:
            raise disk_error(e, self.out) from None
