"""Hub ids (org/name) resolved from the local Hugging Face cache, never from the network.

The cache folder is HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub; a model lives
in models--org--name/snapshots/<revision>, and refs/main names the revision `main` points at.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lowmem_crosslora.errors import InputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, by the environment, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def is_hub_id(value: str) -> bool:
    """org/name, with no further path parts (a relative folder like ./a/b is not a hub id)."""
    return bool(_HUB_ID.match(value)) and not value.startswith(".")


def resolve(path: str | os.PathLike[str], role: str) -> Path:
    """`path` itself when it exists or is not a hub id; else the cached snapshot of the hub id.

    Raises InputError with one line that says where it looked when the id is not cached.
    """
    p = Path(path)
    text = os.fspath(path)
    if p.exists() or os.path.lexists(p) or not is_hub_id(text):  # a broken link or a loop is a path too, not a hub id
        return p
    org, name = text.split("/")
    cache = hub_cache_dir()
    repo = cache / f"models--{org}--{name}"
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    tried = f"looked in {snapshots}"
    if ref.is_file():
        try:
            revision = ref.read_text(encoding="utf-8").strip()
        except OSError:
            revision = ""
        snap = snapshots / revision
        if revision and snap.is_dir():
            return snap
        tried = f"refs/main names {revision or 'nothing'}, which has no folder in {snapshots}"
    elif snapshots.is_dir():
        snaps = sorted(d for d in snapshots.iterdir() if d.is_dir())
        if len(snaps) == 1:
            return snaps[0]
        if snaps:
            tried = f"{snapshots} holds {len(snaps)} revisions and {repo / 'refs' / 'main'} is missing, so none is the one meant"
    raise InputError(
        f"{role} {text}: no such folder, and not in the local Hugging Face cache ({tried}; "
        "set HF_HUB_CACHE or HF_HOME, or download it first); nothing is fetched from the network"
    )


def model_name(path: str | os.PathLike[str]) -> str:
    """What PEFT users expect in an output's base_model_name_or_path: the hub id when the model came
    from the Hugging Face cache, else the absolute path (symbolic links kept as the user gave them)."""
    text = os.fspath(path)
    p = Path(path)
    if not os.path.lexists(p) and is_hub_id(text):
        return text
    return os.path.abspath(p)  # absolute and normalised (no ".."), links not followed
