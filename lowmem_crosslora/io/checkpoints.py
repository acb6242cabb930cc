"""open_checkpoint: a safetensors folder, a GGUF file or a hub id, behind one reader interface."""

from __future__ import annotations

import os

from lowmem_crosslora.io.gguf_model import GGUFCheckpoint, is_gguf
from lowmem_crosslora.io.reader import CheckpointReader
from lowmem_crosslora.io.safetensors_model import Checkpoint


def open_checkpoint(path: str | os.PathLike[str], role: str = "model") -> CheckpointReader:
    """A base model: a GGUF file (gguf_model.GGUFCheckpoint, which needs the optional gguf package)
    or a Hugging Face safetensors folder (Checkpoint). Both have the same reading interface."""

    if is_gguf(path):
        return GGUFCheckpoint(path, role)
    return Checkpoint(path, role)
