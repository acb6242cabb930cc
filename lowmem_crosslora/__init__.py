"""lowmem-crosslora: move a LoRA adapter between base LLMs of different families, data-free,
by the Cross-LoRA method, streaming under an enforced memory budget and resumable.

The public API is the commands' entry points; docs/ARCHITECTURE.md explains the package's layers.
They are imported on first use (PEP 562), so that `import lowmem_crosslora` stays light and the
command line (entry.py) can end quietly on a Ctrl-C while torch is still importing."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lowmem_crosslora.version import __version__

_EXPORTS = {
    "transfer": "lowmem_crosslora.commands.transfer",
    "transfer_batch": "lowmem_crosslora.commands.transfer",
    "precompute_bases": "lowmem_crosslora.commands.bases",
    "run_verify": "lowmem_crosslora.commands.verify",
    "run_refine": "lowmem_crosslora.commands.refine",
    "TransferOptions": "lowmem_crosslora.services.options",
    "RefineOptions": "lowmem_crosslora.services.options",
    "CrossLoraError": "lowmem_crosslora.errors",
    "InputError": "lowmem_crosslora.errors",
    "BudgetError": "lowmem_crosslora.errors",
}
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

if TYPE_CHECKING:
    from lowmem_crosslora.commands.bases import precompute_bases
    from lowmem_crosslora.commands.refine import run_refine
    from lowmem_crosslora.commands.transfer import transfer, transfer_batch
    from lowmem_crosslora.commands.verify import run_verify
    from lowmem_crosslora.errors import BudgetError, CrossLoraError, InputError
    from lowmem_crosslora.services.options import RefineOptions, TransferOptions


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowmem_crosslora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
