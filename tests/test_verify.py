"""verify: tiny models where the answer is known.

- Self-transfer at full rank of square modules (q, o of a llama with hidden = heads * head_dim) gives
  back the adapter itself, so the target effect equals the source effect text by text: recovery 1.
- A random adapter of the right shapes passed as the "transferred" one is indistinguishable from
  the random control of the same norms.
- Bad inputs exit 2 with one line.

The tiny models have no tokenizer of their own; each test folder gets a character-level one built
offline with `tokenizers` (one token per character, multi-byte characters included).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import Zoo, run_cli
from helpers import with_tokenizer, write_llama, write_lora

pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowmem_crosslora.commands.verify import mean_se, ratio_se, run_verify  # noqa: E402
from lowmem_crosslora.errors import InputError  # noqa: E402
from lowmem_crosslora.services.probes import Probe, read_prompts, read_texts, sample_probes  # noqa: E402
from lowmem_crosslora.services.scoring import encode  # noqa: E402

PROMPTS = ["The weather today", "A story:", "Notes from the meeting:"]
FAST = {"prompts": PROMPTS, "samples": 12, "neutral_samples": 4, "max_new_tokens": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model, a q/o LoRA for it, its self-transfer at full rank (r = 64 = hidden), and an unrelated
    random LoRA of the same shapes."""
    from lowmem_crosslora import transfer

    root = tmp_path_factory.mktemp("verify")
    model = write_llama(root / "llama")
    adapter = write_lora(model, root / "lora", seed=10)
    out = root / "self-transfer"
    transfer(adapter, model, model, out, rank=64, device="cpu", use_cache=False)
    other = write_lora(model, root / "random-lora", seed=11)
    return {"model": model, "adapter": adapter, "transferred": out, "random": other, "root": root}


@pytest.fixture(scope="module")
def self_report(pair: dict[str, Path]) -> dict:
    return run_verify(pair["model"], pair["adapter"], pair["model"], pair["transferred"], seed=1, **FAST)


def test_self_transfer_full_rank_recovers_the_source_effect(self_report: dict) -> None:
    s = self_report["verify"]["sets"]["adapter"]
    assert s["texts"] >= 10
    # The adapter makes its own samples clearly more likely on the source ...
    assert s["source_effect"]["mean"] > 0 and s["source_effect"]["z"] > 4
    # ... and the transferred copy does the same on the same model, text by text.
    assert s["recovery"]["mean"] == pytest.approx(1.0, abs=0.02)
    assert s["recovery"]["se"] < 0.02
    assert s["target_effect"]["mean"] == pytest.approx(s["source_effect"]["mean"], rel=0.02)
    # A random adapter of the same norms does not: the test separates them.
    assert s["target_minus_control"]["z"] > 4
    assert s["verdict"].startswith("on samples of source + adapter on neutral prompts: keeps 100%")
    assert "standard errors above the random control" in s["verdict"]
    # Same models: every configuration agrees with its twin.
    m = s["mean_loglik_per_byte"]
    assert m["source_base"] == pytest.approx(m["target_base"], abs=1e-5)
    assert m["source_adapter"] == pytest.approx(m["target_transferred"], abs=1e-3)
    # Neutral texts (samples of the base) are reported apart, as collateral.
    n = self_report["verify"]["sets"]["base"]
    assert n["texts"] >= 3 and n["verdict"].startswith("collateral on neutral text")


def test_report_shares_the_transfer_schema(self_report: dict, pair: dict[str, Path]) -> None:
    r = self_report
    assert r["schema"] == "lowmem-crosslora/report/1" and r["kind"] == "verify"
    t = json.loads((pair["transferred"] / "crosslora_report.json").read_text())
    assert t["schema"] == r["schema"]
    for key in ("seconds", "device", "peak_host_bytes", "baseline_host_bytes", "peak_working_bytes", "host_budget_bytes", "phase_seconds"):
        assert key in r["summary"] and key in t["summary"]
    assert r["summary"]["peak_working_bytes"] > 0
    assert r["summary"]["dtypes"] == {"source": "float32", "target": "float32"}
    norms = r["verify"]["adapter_norms"]
    assert norms["control"]["total"] == pytest.approx(norms["transferred"]["total"], rel=1e-4)
    assert norms["transferred"]["total"] == pytest.approx(norms["source"]["total"], rel=1e-3)  # full rank, square: unchanged
    assert len(r["texts"]) == r["summary"]["texts"]
    assert {t["origin"] for t in r["texts"]} == {"adapter", "base"}
    json.dumps(r)  # serializable


def test_random_adapter_is_indistinguishable_from_the_control(pair: dict[str, Path]) -> None:
    r = run_verify(pair["model"], pair["adapter"], pair["model"], pair["random"], seed=1, **FAST)
    s = r["verify"]["sets"]["adapter"]
    assert s["source_effect"]["z"] > 4
    assert abs(s["target_minus_control"]["z"]) < 2
    assert "indistinguishable from a random adapter of the same size" in s["verdict"]


def test_sampling_is_seeded(pair: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair["model"]), str(pair["adapter"]))
    prompts = ["The weather", "A story:"]
    a = sample_probes(model, tok, prompts, 5, max_new_tokens=12, seed=3)
    b = sample_probes(model, tok, prompts, 5, max_new_tokens=12, seed=3)
    c = sample_probes(model, tok, prompts, 5, max_new_tokens=12, seed=4)
    assert a == b and [p.text for p in a] != [p.text for p in c]
    assert [p.prompt for p in a] == ["The weather"] * 3 + ["A story:"] * 2
    # Samples of one prompt do not depend on how many other prompts there are.
    d = sample_probes(model, tok, prompts[:1], 3, max_new_tokens=12, seed=3)
    assert [p.text for p in d] == [p.text for p in a[:3]]
    # Nor on how the rows are batched (each row has its own generator; prompts of other lengths are left-padded).
    e = sample_probes(model, tok, prompts, 5, max_new_tokens=12, seed=3, rows=2)
    assert [p.text for p in e] == [p.text for p in a]
    # The batched KV-cache sampler draws what a one-row-at-a-time full recomputation draws, token by token.
    assert [p.text for p in a] == [_sample_without_cache(model, tok, p) for p in a]


def _sample_without_cache(model, tok, probe) -> str:  # type: ignore[no-untyped-def]
    """An independent sampler: no cache, no padding, the whole sequence recomputed every step; the same
    nucleus rule (equal probabilities by token id) and the row's own generator (seed from the probe)."""
    from lowmem_crosslora.services.probes import prefix_ids

    g = torch.Generator().manual_seed(probe.seed)
    ids = prefix_ids(tok) + list(tok(probe.prompt, add_special_tokens=False)["input_ids"])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            probs = torch.softmax(model(input_ids=torch.tensor([ids + out])).logits[0, -1].float(), dim=-1)
            sp, idx = probs.sort(descending=True, stable=True)  # equal probabilities by token id
            sp = sp.masked_fill(sp.cumsum(-1) - sp >= 0.95, 0.0)
            cdf = (sp / sp.sum()).cumsum(-1)
            u = float(torch.rand((), generator=g, dtype=torch.float64))
            t = int(idx[min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype))), len(cdf) - 1)])
            if t == tok.eos_token_id:
                break
            out.append(t)
    return tok.decode(out, skip_special_tokens=True)


def test_nucleus_pick_draws_what_sorting_the_whole_row_draws() -> None:
    """Sorting only the top tokens (the whole row where they hold less than top_p, or where the nucleus
    ends in a tie with the least of them) draws the very token a stable sort of the whole row draws
    (equal probabilities by token id): peaked rows, flat rows, and bfloat16 logits, which tie often."""
    from lowmem_crosslora.services.probes import nucleus_pick

    g = torch.Generator().manual_seed(0)
    V = 5000
    logits = torch.randn(64, V, generator=g) * torch.tensor([0.1, 1.0, 3.0, 8.0]).repeat(16).unsqueeze(1)
    for lg in (logits, logits.bfloat16().float(), (logits * 4).round() / 4):
        probs = torch.softmax(lg, dim=-1)
        assert lg is logits or len(probs[0].unique()) < V // 2  # the rounded logits do tie
        for top_p in (0.5, 0.9, 0.95, 1.0):
            for _ in range(4):
                u = torch.rand(64, 1, generator=g)
                sp, idx = probs.sort(dim=-1, descending=True, stable=True)
                sp = sp.masked_fill(sp.cumsum(-1) - sp >= top_p, 0.0)
                cdf = (sp / sp.sum(-1, keepdim=True)).cumsum(-1)
                ref = idx.gather(1, torch.searchsorted(cdf, u).clamp(max=V - 1)).squeeze(1)
                for top in (16, 256, V):
                    assert torch.equal(nucleus_pick(probs, top_p, u, top=top), ref), (top_p, top)


def test_cli_json_and_report_file(pair: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    texts = tmp_path / "mine.txt"
    texts.write_text("Héllo wörld, a text of my own.\n\nAnother one, about 你好.\n\nAnd a third.\n")
    args = ["verify", "--source", str(pair["model"]), "--adapter", str(pair["adapter"]), "--target", str(pair["model"])]
    args += ["--transferred", str(pair["transferred"]), "--samples", "4", "--neutral-samples", "0", "--max-new-tokens", "8", "--device", "cpu"]
    code, out, err = run_cli([*args, "--texts", str(texts), "--json", "--report", str(tmp_path / "v.json")], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r == json.loads((tmp_path / "v.json").read_text())
    assert set(r["verify"]["sets"]) == {"adapter", "user"}
    assert r["verify"]["sets"]["user"]["texts"] == 3
    code, out, err = run_cli([*args, "--quiet"], capsys)
    assert code == 0 and out.startswith("on samples of source + adapter")
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "recovery" in out and "peak host memory" in out


def _bad(capsys: pytest.CaptureFixture[str], source: Path, adapter: Path, target: Path, transferred: Path) -> str:
    args = ["verify", "--source", str(source), "--adapter", str(adapter), "--target", str(target), "--transferred", str(transferred)]
    code, out, err = run_cli([*args, "--samples", "2", "--neutral-samples", "0", "--max-new-tokens", "4", "--device", "cpu"], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_exit_2(pair: dict[str, Path], zoo: Zoo, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    m, ad, tr = pair["model"], pair["adapter"], pair["transferred"]
    wide = with_tokenizer(zoo.model("llama_wide"), pair["root"] / "llama_wide")
    wide_ad = zoo.adapter("llama_wide", "verify-qo", target_modules=["q_proj", "o_proj"])
    deeper_ad = zoo.adapter("llama", "verify-qo", target_modules=["q_proj", "o_proj"])  # same widths, 3 layers instead of 2
    # The adapter is not for that source: other shapes; a module the source does not have.
    assert "do not fit the source weight" in _bad(capsys, m, wide_ad, m, tr)
    assert "do not fit the source weight" in _bad(capsys, wide, ad, m, tr)
    assert "model.layers.2.self_attn" in _bad(capsys, m, deeper_ad, m, tr)
    # The transferred adapter is not for that target.
    assert "transferred adapter" in _bad(capsys, m, ad, wide, tr)
    assert "transferred adapter" in _bad(capsys, m, ad, m, wide_ad)
    # Missing folders and files.
    assert "no such file" in _bad(capsys, tmp_path / "nope", ad, m, tr)
    assert "no such file" in _bad(capsys, m, ad, m, tmp_path / "nope")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(m / f, no_tok / f)
    assert "tokenizer" in _bad(capsys, no_tok, ad, no_tok, tr)
    args = ["verify", "--source", str(m), "--adapter", str(ad), "--target", str(m), "--transferred", str(tr)]
    code, _out, err = run_cli([*args, "--prompts", str(tmp_path / "none.txt")], capsys)
    assert code == 2 and "--prompts" in err


def test_missing_extras_exit_2_with_the_install_line(pair: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    args = ["verify", "--source", str(pair["model"]), "--adapter", str(pair["adapter"]), "--target", str(pair["model"])]
    code, _out, err = run_cli([*args, "--transferred", str(pair["transferred"]), "--device", "cpu"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "pip install 'lowmem-crosslora[verify]'" in err


def test_statistics() -> None:
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3 / 4))
    # Exactly proportional pairs: the ratio is known with no error.
    r, se = ratio_se([0.5, 1.0, 1.5], [1.0, 2.0, 3.0])
    assert r == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-12)
    # Delta method against a simulation of the ratio of means.
    g = torch.Generator().manual_seed(0)
    den = (1.0 + 0.5 * torch.randn(200, 4000, generator=g, dtype=torch.float64)).tolist()
    noise = torch.randn(200, 4000, generator=g, dtype=torch.float64).tolist()
    num = [[0.6 * d + 0.3 * e for d, e in zip(row, nrow, strict=True)] for row, nrow in zip(den, noise, strict=True)]
    ratios = [sum(n[:40]) / sum(d[:40]) for n, d in zip(num, den, strict=True)]
    sim_se = mean_se(ratios)[1] * math.sqrt(len(ratios))
    est = [ratio_se(n[:40], d[:40])[1] for n, d in zip(num[:50], den[:50], strict=True)]
    assert sum(est) / len(est) == pytest.approx(sim_se, rel=0.2)


def test_per_byte_counts_bytes_not_characters(pair: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair["model"])
    e = encode(tok, Probe("Say: ", "é你", None, "user"))
    assert e.nbytes == 2 + 3  # two characters, five UTF-8 bytes
    assert e.ids[0] == tok.bos_token_id and e.first == 1 + len("Say: ")
    assert len(e.ids) == 1 + len("Say: é你")


def test_reading_prompts_and_texts(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_text('first prompt\n\n"a prompt\\nwith a newline"\n')
    assert read_prompts(p) == ["first prompt", "a prompt\nwith a newline"]
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "one"}\n"two"\n{"prompt": "Q: ", "text": "three"}\n')
    assert [(t.prompt, t.text) for t in read_texts(j)] == [("", "one"), ("", "two"), ("Q: ", "three")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match="line 1"):
        read_texts(bad)
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="no texts"):
        read_texts(empty)


def test_transfer_works_without_the_verify_extra(pair: dict[str, Path], tmp_path: Path) -> None:
    """transformers and peft are imported only by verify: with both unimportable, transfer runs and verify says how to install them."""
    import subprocess

    from bench import repo_env

    code = "import sys\nsys.modules['transformers'] = None; sys.modules['peft'] = None\nfrom lowmem_crosslora.cli import main\nmain(sys.argv[1:])\n"
    m, ad = str(pair["model"]), str(pair["adapter"])
    env = repo_env()
    args = ["transfer", "--adapter", ad, "--source", m, "--target", m, "--out", str(tmp_path / "out"), "--rank", "16", "--device", "cpu", "-q", "--no-cache"]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    args = ["verify", "--source", m, "--adapter", ad, "--target", m, "--transferred", str(tmp_path / "out")]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "pip install 'lowmem-crosslora[verify]'" in p.stderr and p.stderr.strip().count("\n") == 0


def test_budget_too_small_exits_3(pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["verify", "--source", str(pair["model"]), "--adapter", str(pair["adapter"]), "--target", str(pair["model"])]
    code, _out, err = run_cli([*args, "--transferred", str(pair["transferred"]), "--device", "cpu", "--max-memory", "1MB"], capsys)
    assert code == 3 and "raise --max-memory to at least" in err


def test_verdicts() -> None:
    from lowmem_crosslora.commands.verify import effects, verdict

    def ll(src: list[float], tgt: list[float], ctl: list[float]) -> dict[str, list[float]]:
        zero = [0.0] * len(src)
        return {"source_base": zero, "source_adapter": src, "target_base": zero, "target_transferred": tgt, "target_control": ctl}

    src = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]
    e = effects(ll(src, [0.6 * v for v in src], [0.01, -0.01, 0.02, 0.0, -0.02, 0.01]))
    assert e["recovery"]["mean"] == pytest.approx(0.6) and e["recovery"]["se"] == pytest.approx(0.0, abs=1e-9)
    assert verdict(e, "x").startswith("on x: keeps 60% (+/- 0) of the source effect,") and "standard errors above the random control" in verdict(e, "x")
    # A negative source effect: moving with it is "above" the control.
    neg = [-v for v in src]
    e = effects(ll(neg, [0.5 * v for v in neg], [0.01, -0.01, 0.02, 0.0, -0.02, 0.01]))
    assert "above the random control" in verdict(e, "x")
    e = effects(ll(src, [0.01, -0.02, 0.0, 0.02, -0.01, 0.0], [0.0, 0.01, -0.02, 0.01, 0.0, -0.01]))
    assert "indistinguishable from a random adapter of the same size" in verdict(e, "x")
    e = effects(ll([0.1, -0.1, 0.05, -0.05], [0.0] * 4, [0.0] * 4))
    assert "no effect to recover" in verdict(e, "x")
