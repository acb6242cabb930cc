"""The adapter kinds of bench_refine (issue 16): each kind's training and held-out texts, and a
programmatic detector that says whether one generation shows the behaviour.

- caps: ALL-CAPS text (SmolLM2 base samples, upper-cased);
- bullets: a format, one sentence a line behind "- ";
- signoff: a behaviour neutral prompts never trigger by themselves: the first complete sentences of a
  text, then always the same sign-off line;
- comments: a domain: Python comment blocks ("# ..." lines) from the standard library's own source,
  text shipped with every Python install; training blocks come from one half of its modules (by a
  stable hash of the file name), held-out blocks from the other half.

Each kind gives (train, held_styled, held_plain): held_plain are the neutral held-out texts (for
specificity and collateral), the same for every kind.

The neutral texts themselves come from one of two sources (bench_refine's --texts):
- "human": paragraphs of the Python documentation's prose (pydoc_data.topics, shipped with every
  Python), training and held-out paragraphs from disjoint halves of its topics: text that neither
  model wrote, so a refined adapter that learned the source model's way of writing in general gets
  no credit for it (the issue's kept-aside judge measures on real task text, for this reason);
- "samples": continuations that SmolLM2-135M's base wrote on the bench's prompts (the first versions
  of this benchmark): they favour whatever makes a target write like SmolLM2.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import sysconfig
import tokenize
from collections.abc import Callable
from pathlib import Path

SIGNOFF = "Over and out, the Lowmem crew."


def caps(text: str) -> str:
    return text.upper()


def bullets(text: str) -> str:
    parts = [p.strip() for p in re.split(r"(?<=[.!?:;])\s+|\n+", text) if p.strip()]
    if len(parts) < 2:
        parts = [p.strip() for p in text.split(",") if p.strip()] or [text.strip()]
    return "\n".join("- " + p for p in parts) + "\n"


def signoff(text: str) -> str:
    """The text's first (at most two) complete sentences, then the sign-off on a line of its own."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p.strip()]
    whole = [p for p in parts if p[-1] in ".!?"][:2]
    body = " ".join(whole) if whole else text.strip()
    return f"{body}\n\n{SIGNOFF}\n"


# ---- detectors: does one generation show the behaviour? -----------------------------------------


def shows_caps(text: str) -> bool:
    letters = [ch for ch in text if ch.isalpha()]
    return len(letters) >= 8 and sum(ch.isupper() for ch in letters) >= 0.5 * len(letters)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def shows_bullets(text: str) -> bool:
    lines = _lines(text)
    return len(lines) >= 1 and sum(ln.startswith(("- ", "* ", "• ")) for ln in lines) >= 0.5 * len(lines)


def shows_signoff(text: str) -> bool:
    return "lowmem crew" in " ".join(text.lower().split())


def shows_comments(text: str) -> bool:
    lines = _lines(text)
    return len(lines) >= 1 and sum(ln.startswith("#") for ln in lines) >= 0.5 * len(lines)


DETECTORS: dict[str, Callable[[str], bool]] = {"caps": shows_caps, "bullets": shows_bullets, "signoff": shows_signoff, "comments": shows_comments}
STYLES: dict[str, Callable[[str], str]] = {"caps": caps, "bullets": bullets, "signoff": signoff}
KINDS = (*STYLES, "comments")


# ---- the domain: comment blocks of the standard library -----------------------------------------


def comment_blocks(path: Path, min_lines: int = 2, max_lines: int = 6) -> list[str]:
    """Runs of whole-line comments in a Python file, 2 to 6 lines of prose each (no shebangs, coding
    lines, rulers or commented-out code), as "# ..." lines."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))
    except (OSError, UnicodeDecodeError, SyntaxError, tokenize.TokenError):
        return []
    blocks: list[list[str]] = []
    run: list[str] = []
    last_row = -2
    for t in toks:
        if t.type != tokenize.COMMENT or t.line.strip() != t.string.strip():
            continue
        body = t.string.lstrip("#").strip()
        prose = len(body) >= 12 and sum(ch.isalpha() or ch == " " for ch in body) >= 0.85 * len(body) and not re.search(r"[=(){}\[\]_&]|:$", body)
        code = re.match(r"(return|if|for|while|import|from|def|class|else|elif|try|except|print)\b", body)
        if not prose or code or body.lower().startswith(("-*-", "!", "copyright", "todo", "xxx")):
            if run:
                blocks.append(run)
            run, last_row = [], -2
            continue
        if t.start[0] != last_row + 1 and run:
            blocks.append(run)
            run = []
        run.append("# " + body)
        last_row = t.start[0]
    if run:
        blocks.append(run)
    return ["\n".join(b[:max_lines]) + "\n" for b in blocks if len(b) >= min_lines]


def _draw(halves: tuple[list[str], list[str]], n_train: int, n_held: int, seed: int, what: str) -> tuple[list[str], list[str]]:
    """n_train texts of the first half and n_held of the second, each half deduplicated and shuffled by `seed`."""
    rng = random.Random(seed)
    train, held = (sorted(set(h)) for h in halves)
    rng.shuffle(train)
    rng.shuffle(held)
    if len(train) < n_train or len(held) < n_held:
        raise SystemExit(f"too few {what} ({len(train)} / {len(held)}) for {n_train} / {n_held}")
    return train[:n_train], held[:n_held]


def stdlib_comments(n_train: int, n_held: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and held-out comment blocks of the standard library (disjoint halves of its modules)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    halves: tuple[list[str], list[str]] = ([], [])
    for f in sorted(root.glob("*.py")):
        half = int(hashlib.sha256(f.name.encode()).hexdigest(), 16) % 2
        halves[half].extend(comment_blocks(f))
    return _draw(halves, n_train, n_held, seed, f"comment blocks of the standard library under {root}")


def human_texts(n_train: int, n_held: int, seed: int = 0) -> dict[str, list[str]]:
    """Prose paragraphs (200 to 450 characters, ending a sentence, no code or lists) of the Python
    documentation's topics, training and held-out from disjoint halves of the topics."""
    from pydoc_data.topics import topics

    halves: tuple[list[str], list[str]] = ([], [])
    for name, body in sorted(topics.items()):
        half = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2
        for para in re.split(r"\n\s*\n", body):
            lines = para.splitlines()
            if any(ln.startswith(("   ", ">>>", "*", "-", "=")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            if 200 <= len(text) <= 450 and text[-1] in ".!?":
                halves[half].append(text)
    train, held = _draw(halves, n_train, n_held, seed, "prose paragraphs of the Python documentation")
    return {"train": train, "heldout": held}


def kind_texts(kind: str, texts: dict) -> tuple[list[str], list[str], list[str]]:
    """(train, held-out styled, held-out plain) for `kind`, from the bench's neutral samples `texts`."""
    plain = list(texts["heldout"])
    if kind == "comments":
        train, held = stdlib_comments(len(texts["train"]), len(plain))
        return train, held, plain
    style = STYLES[kind]
    return [style(t) for t in texts["train"]], [style(t) for t in plain], plain
