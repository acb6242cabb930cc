"""A llama.cpp LoRA GGUF as --adapter (issue 17, friction).

The GGUF is written from a PEFT adapter with the tool's own llama.cpp writer (the layout
convert_lora_to_gguf.py writes, q/k rows permuted for the llama architecture). Transferring it must
give the very bytes the PEFT adapter gives; scales follow llama.cpp's rule (alpha / rank per module,
1 where alpha is 0); wrong files are refused with one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import refused, run_cli  # noqa: E402
from gguf_helpers import write_gguf  # noqa: E402

from lowmem_crosslora.io.adapter import load_adapter, restore_gguf_rows  # noqa: E402
from lowmem_crosslora.io.gguf_lora import LoraEntry, entries_for_file, write_lora_gguf  # noqa: E402
from lowmem_crosslora.io.partial import ADAPTER_NAME  # noqa: E402
from lowmem_crosslora.services.synthetic import ModelSpec, write_adapter, write_model  # noqa: E402

SRC = ModelSpec("llama", 64, 128, 2, 4, 2, 16, vocab=64)
TGT = ModelSpec("qwen2", 96, 192, 2, 4, 2, 24, vocab=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-adapter")
    src = write_model(root / "src", SRC, dtype="float32", seed=0, spectrum="decaying")
    tgt = write_model(root / "tgt", TGT, dtype="float32", seed=1, spectrum="decaying")
    ad = write_adapter(root / "adapter", SRC, rank=4, alpha=8, seed=2, base=str(src))
    lora = root / "adapter.gguf"
    file = ad / ADAPTER_NAME
    write_lora_gguf(lora, file, entries_for_file(file, alpha=8.0), arch="llama", alpha=8.0, num_heads=4, num_kv_heads=2)
    return {"src": src, "tgt": tgt, "adapter": ad, "lora.gguf": lora, "root": root}


def _transfer(capsys: pytest.CaptureFixture[str], adapter: Path, pair: dict[str, Path], out: Path) -> None:
    args = ["transfer", "--adapter", str(adapter), "--source", str(pair["src"]), "--target", str(pair["tgt"])]
    rc, _out, err = run_cli([*args, "--out", str(out), "--rank", "16", "--device", "cpu", "--no-cache", "-q"], capsys)
    assert rc == 0, err


def test_lora_gguf_transfers_to_the_peft_adapters_bytes(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _transfer(capsys, pair["adapter"], pair, tmp_path / "from-peft")
    _transfer(capsys, pair["lora.gguf"], pair, tmp_path / "from-gguf")
    a = (tmp_path / "from-peft" / ADAPTER_NAME).read_bytes()
    b = (tmp_path / "from-gguf" / ADAPTER_NAME).read_bytes()
    assert a == b


def test_rows_and_scales_read_back(pair: dict[str, Path]) -> None:
    """Every factor read from the GGUF (q/k rows restored with the source's heads) equals the PEFT one."""
    peft = load_adapter(pair["adapter"])
    ad = load_adapter(pair["lora.gguf"])
    assert ad.permuted_rows  # q and k lora_B, until the source's heads are known
    restore_gguf_rows(ad, 4, 2, "llama")
    assert set(ad.modules) == set(peft.modules)
    for m, lm in peft.modules.items():
        g = ad.modules[m]
        assert (g.rank, g.scale) == (lm.rank, lm.scale)
        assert torch.equal(ad.read(g.a_name), peft.read(lm.a_name)) and torch.equal(ad.read(g.b_name), peft.read(lm.b_name))


def test_llama_cpp_scale_rules(pair: dict[str, Path], tmp_path: Path) -> None:
    """Ranks that differ per module and alpha 0: llama.cpp's scale, alpha / rank, or 1 at alpha 0."""
    file = pair["adapter"] / ADAPTER_NAME
    entries = entries_for_file(file, alpha=None)  # relative scale 1: factors written as they are
    for alpha in (0.0, 6.0):
        dest = tmp_path / f"a{alpha}.gguf"
        write_lora_gguf(dest, file, entries, arch="llama", alpha=alpha, num_heads=4, num_kv_heads=2)
        ad = load_adapter(dest)
        for lm in ad.modules.values():
            assert lm.scale == pytest.approx(alpha / lm.rank if alpha else 1.0)
    # one module of another rank: rank_pattern, and its own scale
    e0 = entries[0]
    import safetensors.torch as st

    tensors = st.load_file(str(file))
    tensors[e0.a_name] = tensors[e0.a_name][:2].contiguous()
    tensors[e0.b_name] = tensors[e0.b_name][:, :2].contiguous()
    other = tmp_path / "other.safetensors"
    st.save_file(tensors, str(other))
    mixed = [LoraEntry(e.layer, e.module, e.a_name, e.b_name, e.scale, 2 if e is e0 else e.rank) for e in entries]
    write_lora_gguf(tmp_path / "mixed.gguf", other, mixed, arch="llama", alpha=6.0, num_heads=4, num_kv_heads=2)
    ad = load_adapter(tmp_path / "mixed.gguf")
    assert ad.config["r"] == 4 and len(ad.config["rank_pattern"]) == 1
    assert sorted({(m.rank, round(m.scale, 6)) for m in ad.modules.values()}) == [(2, 3.0), (4, 1.5)]


def test_a_model_gguf_as_adapter_is_one_line(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_gguf = write_gguf(pair["src"], tmp_path / "model.gguf")
    out = tmp_path / "out"
    args = ["transfer", "--adapter", str(model_gguf), "--source", str(pair["src"]), "--target", str(pair["tgt"]), "--out", str(out)]
    line = refused(args, capsys, [model_gguf], out)
    assert "not a LoRA adapter" in line


def test_lora_gguf_for_another_architecture_is_refused(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A GGUF made for llama given with a qwen2 source: one line naming both."""
    out = tmp_path / "out"
    args = ["transfer", "--adapter", str(pair["lora.gguf"]), "--source", str(pair["tgt"]), "--target", str(pair["src"]), "--out", str(out)]
    line = refused(args, capsys, [pair["lora.gguf"]], out)
    assert "'llama'" in line and "'qwen2'" in line


@pytest.mark.parametrize("command", ["verify", "refine"])
def test_verify_and_refine_refuse_a_gguf_plainly(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """PEFT runs adapters from folders: a LoRA GGUF is refused with one line pointing to `transfer`."""
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    args = [command, "--source", str(pair["src"]), "--adapter", str(pair["lora.gguf"]), "--target", str(pair["tgt"]), "--device", "cpu"]
    args += ["--out", str(out)] if command == "refine" else ["--transferred", str(pair["adapter"])]
    line = refused(args, capsys, [pair["lora.gguf"]], out)
    assert "not a single file" in line and "`transfer`" in line
