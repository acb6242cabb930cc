"""The migration manifest: one job per line (JSON lines), or one JSON array of the same objects.

    {"adapter": "loras/caps", "source": "HuggingFaceTB/SmolLM2-135M", "target": "qwen-0.5b", "out": "moved/caps"}
    {"adapter": "loras/bullets", "source": "...", "target": "...", "out": "moved/bullets", "refine": true}

Relative paths are read from the manifest's folder; an adapter, source or target that is not a path
there is kept as typed (a hub id in the local cache). Blank lines and lines starting with '#' are
skipped. Every line is checked before any job starts: one line names the first problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem_crosslora.errors import InputError

REQUIRED = ("adapter", "source", "target", "out")
OPTIONAL = ("refine",)


@dataclass(frozen=True)
class Job:
    line: int  # where the manifest states it (1-based)
    adapter: str
    source: str
    target: str
    out: str
    refine: bool = False

    @property
    def pair(self) -> tuple[str, str]:
        return self.source, self.target

    @property
    def kind(self) -> str:
        return "refine" if self.refine else "transfer"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "adapter": self.adapter, "source": self.source, "target": self.target, "out": self.out, "refine": self.refine}


def read_manifest(path: Path) -> list[Job]:
    """The jobs of the manifest at `path`, checked: required fields, types, no unknown field, no two
    jobs writing one output."""
    where = f"manifest {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: cannot read it: {e}") from None
    entries = _entries(text, where)
    if not entries:
        raise InputError(f"{where}: no jobs (one JSON object per line: adapter, source, target, out, refine)")
    base = path.resolve().parent
    jobs: list[Job] = []
    outs: dict[str, int] = {}
    for line, obj in entries:
        job = _job(obj, line, base, where)
        key = str(Path(job.out).resolve())
        if key in outs:
            raise InputError(f"{where} line {line}: output {job.out} is also line {outs[key]}'s; each job needs its own output")
        outs[key] = line
        jobs.append(job)
    return jobs


def _entries(text: str, where: str) -> list[tuple[int, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise InputError(f"{where}: not valid JSON: {e}") from None
        return [(i, obj) for i, obj in enumerate(items, start=1)]
    out = []
    for i, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            out.append((i, json.loads(s)))
        except ValueError as e:
            raise InputError(f"{where} line {i}: not a JSON object: {e}") from None
    return out


def _job(obj: Any, line: int, base: Path, where: str) -> Job:
    at = f"{where} line {line}"
    if not isinstance(obj, dict):
        raise InputError(f"{at}: expected a JSON object with {', '.join(REQUIRED)}")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise InputError(f"{at}: unknown field {unknown[0]!r} (fields: {', '.join(REQUIRED + OPTIONAL)})")
    values: dict[str, str] = {}
    for key in REQUIRED:
        v = obj.get(key)
        if not isinstance(v, str) or not v.strip():
            raise InputError(f"{at}: {key!r} must be a non-empty string")
        values[key] = v
    refine = obj.get("refine", False)
    if not isinstance(refine, bool):
        raise InputError(f"{at}: 'refine' must be true or false (got {refine!r})")
    inputs = {k: _input(values[k], base) for k in ("adapter", "source", "target")}
    out = Path(values["out"]).expanduser()
    return Job(line, inputs["adapter"], inputs["source"], inputs["target"], str(out if out.is_absolute() else base / out), refine)


def _input(value: str, base: Path) -> str:
    """A path relative to the manifest's folder where one exists there; otherwise as typed (a hub id)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    here = base / p
    return str(here) if here.exists() or value.startswith((".", "~")) else value
