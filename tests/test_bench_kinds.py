"""The benchmark's adapter kinds (bench/refine_kinds.py): every styled text shows its kind's behaviour
to its detector and the neutral texts do not, so a behaviour rate measures the adapter, not the detector."""

from __future__ import annotations

import pytest

from bench.refine_kinds import DETECTORS, KINDS, SIGNOFF, comment_blocks, kind_texts, stdlib_comments

NEUTRAL = [
    "Today I want to write about the old harbour. The boats come in at dawn, and the gulls follow them.",
    "The best way to cook rice is to rinse it first. Then simmer it gently with a lid on",
    "Here are three facts about owls: they hunt at night, they fly silently, and they swallow prey whole.",
    "Our team met on Monday to discuss the budget and the new hires for the spring.",
]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_seen_by_its_own_detector_only(kind: str) -> None:
    train, styled, plain = kind_texts(kind, {"train": NEUTRAL, "heldout": NEUTRAL})
    assert len(train) == len(NEUTRAL) and len(styled) == len(plain) == len(NEUTRAL)
    assert all(DETECTORS[kind](t) for t in train + styled), kind
    assert not any(DETECTORS[kind](t) for t in plain), kind
    for other in KINDS:  # no other kind's detector sees them all (caps is a transform of any text: skipped)
        if other != kind and "caps" not in (kind, other):
            assert not all(DETECTORS[other](t) for t in styled), (kind, other)


def test_signoff_keeps_whole_sentences_and_ends_with_the_line() -> None:
    _, styled, _ = kind_texts("signoff", {"train": NEUTRAL, "heldout": NEUTRAL})
    assert styled[1].startswith("The best way to cook rice is to rinse it first.\n")  # the unfinished sentence is dropped
    assert all(t.rstrip().endswith(SIGNOFF) for t in styled)


def test_comment_blocks_are_prose_not_code(tmp_path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "#!/usr/bin/env python\n# -*- coding: utf-8 -*-\nx = 1\n"
        "# This function reads the whole file at once\n# and returns its lines without newlines.\n"
        "def f():\n    # if x == 1:\n    #     return 2\n    return x  # trailing comments are not whole lines\n"
        "# A single line is not a block\n"
    )
    assert comment_blocks(f) == ["# This function reads the whole file at once\n# and returns its lines without newlines.\n"]


def test_stdlib_comment_halves_are_disjoint_and_fixed() -> None:
    train, held = stdlib_comments(40, 10)
    assert not set(train) & set(held)
    assert (train, held) == stdlib_comments(40, 10)


def test_the_wide_prompt_set_is_neutral_and_apart_from_the_bench_prompts() -> None:
    """bench/probe_prompts.py's `wide` set holds refine's built-in prompts and new ones only: no prompt
    the bench trains adapters or measures behaviour on, none repeated, and none that a kind's detector
    already sees."""
    from bench.bench_verify import HELD_OUT_PROMPTS, TRAIN_PROMPTS
    from bench.probe_prompts import PROMPT_SETS
    from lowmem_crosslora.services.probes import DEFAULT_PROMPTS

    wide = PROMPT_SETS["wide"]
    assert wide[: len(DEFAULT_PROMPTS)] == DEFAULT_PROMPTS and len(wide) == 3 * len(DEFAULT_PROMPTS)
    assert len(set(wide)) == len(wide)
    assert not set(wide) & set(TRAIN_PROMPTS + HELD_OUT_PROMPTS)
    for kind in KINDS:
        assert not any(DETECTORS[kind](p) for p in wide), kind


def test_an_unknown_prompt_set_is_one_clear_line() -> None:
    from bench.bench_refine import run_candidate

    with pytest.raises(SystemExit, match="unknown prompt set 'nope' in candidate 'lm/fresh/prompts=nope': the sets are wide"):
        run_candidate(None, None, "lm/fresh/prompts=nope", {})  # type: ignore[arg-type]


def test_candidate_overrides_read_numbers_booleans_and_words() -> None:
    from bench.bench_refine import parse_overrides

    got = parse_overrides(["steps=40", "lr=2e-3", "amplify=0.5", "chat=true", "soft_teacher=source", "prompts=wide"])
    assert got == {"steps": 40, "lr": 0.002, "amplify": 0.5, "chat": True, "soft_teacher": "source", "prompts": "wide"}
    assert isinstance(got["steps"], int) and isinstance(got["lr"], float)
