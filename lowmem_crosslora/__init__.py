"""lowmem-crosslora: move a LoRA adapter between base LLMs of different families, data-free,
by the Cross-LoRA method, streaming under an enforced memory budget and resumable."""

from __future__ import annotations

__version__ = "0.1.0"

from .engine import TransferOptions, transfer, transfer_batch  # noqa: E402
from .errors import BudgetError, CrossLoraError, InputError  # noqa: E402
from .refine import run_refine  # noqa: E402  (imports transformers and peft only when called)
from .verify import run_verify  # noqa: E402  (imports transformers and peft only when called)

__all__ = ["transfer", "transfer_batch", "run_verify", "run_refine", "TransferOptions", "CrossLoraError", "InputError", "BudgetError", "__version__"]
