"""lowmem-crosslora: move a LoRA adapter between base LLMs of different families, data-free,
by the Cross-LoRA method, streaming under an enforced memory budget and resumable.

The public API is the commands' entry points; docs/ARCHITECTURE.md explains the package's layers."""

from __future__ import annotations

from lowmem_crosslora.commands.bases import precompute_bases
from lowmem_crosslora.commands.refine import run_refine  # imports transformers and peft only when called
from lowmem_crosslora.commands.transfer import transfer, transfer_batch
from lowmem_crosslora.commands.verify import run_verify  # imports transformers and peft only when called
from lowmem_crosslora.errors import BudgetError, CrossLoraError, InputError
from lowmem_crosslora.services.options import RefineOptions, TransferOptions
from lowmem_crosslora.version import __version__

__all__ = [
    "transfer",
    "transfer_batch",
    "precompute_bases",
    "run_verify",
    "run_refine",
    "TransferOptions",
    "RefineOptions",
    "CrossLoraError",
    "InputError",
    "BudgetError",
    "__version__",
]
