"""The "excess" probe selection (issue 16, a candidate): keep the texts the adapter moves most, never two
near-duplicates, and say what was kept. Properties checked on generated sets, then one refine run
on the tiny pair with the candidate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_crosslora.services.probe_select import _grams, excess, near_duplicate, select
from lowmem_crosslora.services.probes import PROBES_NAME

WORDS = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"]), min_size=0, max_size=12).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(WORDS, st.floats(0, 10)), min_size=0, max_size=30), st.integers(0, 30))
def test_select_keeps_the_most_moved_texts_and_no_near_duplicates(items: list[tuple[str, float]], keep: int) -> None:
    texts, scores = [t for t, _ in items], [s for _, s in items]
    kept, comp = select(texts, scores, keep)
    assert kept == sorted(kept) and len(set(kept)) == len(kept) and len(kept) <= keep
    assert comp["sampled"] == len(texts) and comp["kept"] == len(kept)
    grams = [_grams(texts[i]) for i in kept]
    assert not any(near_duplicate(grams[i], grams[j]) for i in range(len(kept)) for j in range(i))
    # Texts are taken by score (ties: the earlier first); one left out that comes before a kept one,
    # or while places were left, nearly duplicates a kept text that came before it.
    rank = {i: (-scores[i], i) for i in range(len(texts))}
    for i in set(range(len(texts))) - set(kept):
        if len(kept) < keep or any(rank[i] < rank[k] for k in kept):
            assert any(near_duplicate(_grams(texts[i]), _grams(texts[k])) and rank[k] < rank[i] for k in kept)


def test_excess_is_the_mean_absolute_change_per_token() -> None:
    assert excess([0.5, -1.5, 1.0]) == pytest.approx(1.0)
    assert excess([]) == 0.0


def test_refine_with_the_excess_selection_reports_its_composition(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from helpers import fast_refine, refine_pair

    models = refine_pair(tmp_path)
    report = fast_refine(models, tmp_path / "out", probe_select="excess", holdout=4, samples=4)
    sel = report["refine"]["probe_set"]["selection"]
    assert sel["rule"] == "excess"
    assert sel["train"]["sampled"] == 8 and sel["train"]["kept"] <= 4
    assert sel["holdout"]["kept"] <= 4
    if sel["train"]["mean_excess_dropped"] is not None:
        assert sel["train"]["mean_excess_kept"] >= sel["train"]["mean_excess_dropped"] - 1e-9 or sel["train"]["near_duplicates_dropped"] > 0
    kept = json.loads((tmp_path / "out" / PROBES_NAME).read_text())
    assert sum(1 for t in kept["texts"] if t["origin"] == "adapter") == sel["train"]["kept"]
    assert report["options"]["probe_select"] == "excess"


def _source_with_adapter(tmp_path: Path) -> tuple[Any, Any, list[list[int]]]:
    """The tiny llama source with its LoRA (PEFT, eval mode), its tokenizer, and two prompts as ids."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from helpers import refine_pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = refine_pair(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(m["source"]))
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(m["source"])), str(m["adapter"]))
    model.eval()
    prompts = [tok("The weather", add_special_tokens=False)["input_ids"], tok("A story:", add_special_tokens=False)["input_ids"]]
    return tok, model, prompts


def test_amplified_sampling_is_plain_sampling_when_the_adapter_changes_nothing(tmp_path: Path) -> None:
    """logits_A + alpha (logits_A - logits_base) is logits_A when the adapter moves nothing (lora_B = 0):
    the same rows, token for token, as plain sampling with the same seeds; with a real adapter the
    amplified rows differ."""
    from lowmem_crosslora.services.probes import _eos_ids, _sample_rows

    tok, model, prompts = _source_with_adapter(tmp_path)
    eos = _eos_ids(model, tok)
    plain = _sample_rows(model, prompts, [1, 2], eos, 12, 0.95, 1.0, "cpu")
    amped = _sample_rows(model, prompts, [1, 2], eos, 12, 0.95, 1.0, "cpu", amplify=1.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.zero_()
    still = _sample_rows(model, prompts, [1, 2], eos, 12, 0.95, 1.0, "cpu")
    assert _sample_rows(model, prompts, [1, 2], eos, 12, 0.95, 1.0, "cpu", amplify=1.0) == still
    assert amped != plain


def test_refine_with_amplified_probes_reports_them(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from helpers import fast_refine, refine_pair

    models = refine_pair(tmp_path)
    report = fast_refine(models, tmp_path / "out", amplify=0.75, samples=4)
    sel = report["refine"]["probe_set"]["selection"]
    assert sel["amplified"] == {"alpha": 0.75, "sampled": 2} and report["options"]["amplify"] == 0.75


CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"


def _with_chat_template(model_dir: Path) -> None:
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg))


def test_chat_probes_are_the_sources_own_user_turns_and_answers_as_plain_text(tmp_path: Path) -> None:
    """The "Magpie" probes: the template's opening of a user turn, the source writes the turn, then
    answers it inside the template; the probe keeps plain text only (no template tokens), seeded."""
    pytest.importorskip("transformers")
    from helpers import refine_pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_crosslora.services.probes import chat_opening, sample_chat_probes

    m = refine_pair(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(m["source"]))
    assert chat_opening(tok) is None  # no template: no chat probes
    _with_chat_template(m["source"])
    tok = AutoTokenizer.from_pretrained(str(m["source"]))
    assert chat_opening(tok) == ("<s>user: ", "</s><s>assistant: ")
    model = AutoModelForCausalLM.from_pretrained(str(m["source"]))
    probes = sample_chat_probes(model, tok, 12, max_new_tokens=10, seed=3)
    assert probes and probes == sample_chat_probes(model, tok, 12, max_new_tokens=10, seed=3)
    assert probes != sample_chat_probes(model, tok, 12, max_new_tokens=10, seed=4)
    for p in probes:
        assert p.prompt.endswith("\n") and "\n" not in p.prompt[:-1] and "<s>" not in p.prompt + p.text and "</s>" not in p.prompt + p.text
        assert p.origin == "adapter" and len(p.text.encode()) >= 4


def test_refine_with_chat_probes_reports_them_and_falls_back_without_a_template(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from helpers import fast_refine, refine_pair

    models = refine_pair(tmp_path)
    plain = fast_refine(models, tmp_path / "plain", chat=True, samples=4)
    assert plain["refine"]["probe_set"]["selection"]["chat"] == {"sampled": 0}  # the tiny source has no template
    _with_chat_template(models["source"])
    report = fast_refine(models, tmp_path / "out", chat=True, samples=4)
    assert 0 < report["refine"]["probe_set"]["selection"]["chat"]["sampled"] <= 2 and report["options"]["chat"] is True
    kept = json.loads((tmp_path / "out" / PROBES_NAME).read_text())
    assert not any("<s>" in t["prompt"] for t in kept["texts"])


def test_sampling_runs_one_forward_pass_per_token_drawn(tmp_path: Path) -> None:
    """The prompt's pass draws the first token and each later pass one more: n tokens cost n passes,
    none after the last (it was one pass in 49 of the source phase at the defaults); a shorter draw is
    a prefix of a longer one with the same seeds."""
    from lowmem_crosslora.services.probes import _sample_rows

    _tok, model, prompts = _source_with_adapter(tmp_path)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    short = _sample_rows(model, prompts, [1, 2], set(), 5, 0.95, 1.0, "cpu")
    assert len(calls) == 5 and [len(r) for r in short] == [5, 5]
    long = _sample_rows(model, prompts, [1, 2], set(), 9, 0.95, 1.0, "cpu")
    assert len(calls) == 5 + 9 and [r[:5] for r in long] == short
