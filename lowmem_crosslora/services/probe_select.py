"""Which sampled probe texts refine keeps: all of them ("plain"), or those that show the adapter
("excess", issue 16): sample twice as many texts of source + adapter, drop near-duplicates, and keep
the half whose tokens the adapter moves most (the largest mean |log p_adapter - log p_base| per
scored token). Neutral free continuations mostly show what the base would write anyway; the texts
kept are the ones where the adapter's behaviour is visible, for training and for the held-out split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

SELECTIONS = ("plain", "excess")
OVERSAMPLE = 2  # "excess" samples this many times the texts it keeps
NGRAM = 3  # near-duplicates: word 3-gram sets overlapping more than DUPLICATE (Jaccard)
DUPLICATE = 0.5


def drawn(name: str, wanted: int) -> int:
    """How many texts to sample to keep `wanted` under selection `name`."""
    return wanted * OVERSAMPLE if name == "excess" else wanted


def excess(delta: Sequence[float]) -> float:
    """Mean |change in log-probability| per scored token (0 for a text with nothing scored)."""
    return math.fsum(abs(d) for d in delta) / len(delta) if delta else 0.0


def _grams(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    if len(words) < NGRAM:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def near_duplicate(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> bool:
    if not a or not b:
        return a == b
    return len(a & b) / len(a | b) > DUPLICATE


def select(texts: Sequence[str], scores: Sequence[float], keep: int) -> tuple[list[int], dict[str, Any]]:
    """Indices of the `keep` texts with the highest scores, skipping any that nearly duplicates a text
    already kept (ties keep the earlier text); returned in their original order, with the set's
    composition for the report."""
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    grams: list[set[tuple[str, ...]]] = []
    duplicates = 0
    for i in order:
        if len(kept) == keep:
            break
        g = _grams(texts[i])
        if any(near_duplicate(g, h) for h in grams):
            duplicates += 1
            continue
        kept.append(i)
        grams.append(g)
    dropped = [i for i in range(len(texts)) if i not in set(kept)]

    def mean(ix: list[int]) -> float | None:
        return round(math.fsum(scores[i] for i in ix) / len(ix), 6) if ix else None

    return sorted(kept), {
        "sampled": len(texts),
        "kept": len(kept),
        "near_duplicates_dropped": duplicates,
        "mean_excess_kept": mean(kept),
        "mean_excess_dropped": mean(dropped),
    }
