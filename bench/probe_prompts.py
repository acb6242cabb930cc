"""Prompt sets for refine's probe texts that the benchmark compares (issue 16: probes that show the
adapter). `wide`: refine's 16 neutral prompts and 32 more of the same kind, so that the same number
of samples spreads over three times the openings (2 a prompt at refine's 96) - more distinct texts
for the same sampling cost. None names a style, task or domain of the bench's adapter kinds (capitals,
bullet lists, code comments, a sign-off), and none is one of the prompts the bench trains adapters or
measures behaviour on (bench_verify's TRAIN_PROMPTS and HELD_OUT_PROMPTS)."""

from __future__ import annotations

from lowmem_crosslora.services.probes import DEFAULT_PROMPTS

MORE_NEUTRAL_PROMPTS: tuple[str, ...] = (
    "The bakery on the corner",
    "Last summer my cousin visited and",
    "The first snow fell overnight.",
    "A walk along the beach",
    "The neighbours' dog",
    "On the way home from work,",
    "The old farmhouse had",
    "Our village holds a fair every autumn.",
    "The bus was late again,",
    "A quiet evening at home",
    "The park near my flat",
    "When I was a child,",
    "The painter set up her easel",
    "At the edge of the forest",
    "The festival began at noon.",
    "My grandmother used to say",
    "The ferry crossed the bay",
    "A rainy afternoon in the city",
    "The lighthouse keeper",
    "After dinner we sat outside and",
    "The market square was busy",
    "Some memories of my first job",
    "The cat slept on the windowsill",
    "Our holiday by the lake",
    "The shop had closed early,",
    "A conversation with an old friend",
    "The garden after the storm",
    "On Sunday mornings the street is",
    "The stars were bright that night.",
    "A visit to the zoo",
    "The choir rehearsed in the hall",
    "The bridge over the canal",
)

PROMPT_SETS: dict[str, tuple[str, ...]] = {"wide": DEFAULT_PROMPTS + MORE_NEUTRAL_PROMPTS}
