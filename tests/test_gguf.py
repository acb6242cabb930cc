"""GGUF in and out (issue 7): GGUF base models as --source / --target, and a llama.cpp LoRA GGUF
as output, on tiny GGUF files written here with gguf.GGUFWriter (F32, F16, BF16 and quantized).

Needs the `gguf` package (in the test extras); skipped cleanly without it.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import run_cli  # noqa: E402
from gguf_helpers import dequantized_folder, read_hf, write_gguf  # noqa: E402

import lowmem_crosslora  # noqa: E402
from bench.crash import command, run_child  # noqa: E402
from lowmem_crosslora.io.gguf_lora import GGUF_NAME  # noqa: E402
from lowmem_crosslora.io.gguf_model import GGUFCheckpoint, permute_rows, reverse_permute_rows  # noqa: E402
from lowmem_crosslora.io.partial import ADAPTER_NAME, CONFIG_NAME, REPORT_NAME  # noqa: E402
from lowmem_crosslora.services.synthetic import ModelSpec, write_adapter, write_model  # noqa: E402

# Rows of 64, 128 and 192 values: multiples of the 32-value blocks of Q8_0 / Q4_0 / Q4_1 / Q5_0.
SRC = ModelSpec("llama", 64, 128, 2, 4, 2, 16, vocab=64)
TGT = ModelSpec("qwen2", 96, 192, 2, 4, 2, 24, vocab=64)
MODULES = ("q", "k", "v", "o", "gate", "up", "down")
QUANTS = {"q": "Q8_0", "k": "Q4_0", "v": "Q4_1", "o": "Q5_0", "gate": "F16", "up": "BF16", "down": "Q8_0"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    src = write_model(root / "src", SRC, dtype="float32", seed=0, spectrum="decaying")
    tgt = write_model(root / "tgt", TGT, dtype="float32", seed=1, spectrum="decaying")
    ad = write_adapter(root / "adapter", SRC, rank=4, alpha=8, seed=2, base=str(src))
    out = {"src": src, "tgt": tgt, "adapter": ad}
    out["src.gguf"] = write_gguf(src, root / "src.gguf")
    out["tgt.gguf"] = write_gguf(tgt, root / "tgt.gguf")
    out["src.q.gguf"] = write_gguf(src, root / "src-q.gguf", QUANTS)
    out["tgt.q.gguf"] = write_gguf(tgt, root / "tgt-q.gguf", QUANTS)
    out["src.deq"] = dequantized_folder(src, out["src.q.gguf"], root / "src-deq")
    out["tgt.deq"] = dequantized_folder(tgt, out["tgt.q.gguf"], root / "tgt-deq")
    return out


def run(models: dict[str, Path], source: str, target: str, out: Path, **kw: object) -> dict:
    opts = {"rank": 320, "device": "cpu", "use_cache": False, "force": True}
    opts.update(kw)
    return lowmem_crosslora.transfer(models["adapter"], models[source], models[target], out, **opts)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / ADAPTER_NAME))


# ---- reading --------------------------------------------------------------------------------


def test_header_matches_gguf_reader(models: dict[str, Path]) -> None:
    for key in ("src.q.gguf", "tgt.q.gguf"):
        ck = GGUFCheckpoint(models[key])
        reader = gguf.GGUFReader(models[key])
        assert len(ck.tensors) == len(reader.tensors)
        by_gguf = {ck._entries[n].gguf_name: ck._entries[n] for n in ck._entries}
        for t in reader.tensors:
            mine = by_gguf[t.name]
            assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            assert mine.type_name == t.tensor_type.name
            assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
    ck = GGUFCheckpoint(models["src.gguf"])
    d = ck.dims
    assert (d.hidden, d.intermediate, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim) == (64, 128, 2, 4, 2, 16)
    assert ck.family.name == "llama" and ck.weight_name(1, "down") == "model.layers.1.mlp.down_proj.weight"
    tk = GGUFCheckpoint(models["tgt.gguf"])
    assert tk.family.name == "qwen2" and tk.dims.head_dim == 24  # key_length read from the metadata


def test_f32_gguf_reads_the_exact_hf_weights(models: dict[str, Path]) -> None:
    """F32: every module (q and k un-permuted) is bit-identical to the safetensors weight."""
    for key, folder in (("src.gguf", "src"), ("tgt.gguf", "tgt")):
        hf = read_hf(models[folder])
        ck = GGUFCheckpoint(models[key])
        for layer in range(ck.dims.num_layers):
            for mod in MODULES:
                name = ck.weight_name(layer, mod)
                assert torch.equal(ck.read(name), hf[name]), name
                assert torch.equal(ck.read_rows(name, 3, 11), hf[name][3:11]), name


def test_dequantized_reads_match_gguf_and_row_slices(models: dict[str, Path]) -> None:
    ck = GGUFCheckpoint(models["src.q.gguf"])
    hf = read_hf(models["src"])
    reader = {t.name: t for t in gguf.GGUFReader(models["src.q.gguf"]).tensors}
    for mod, tname in QUANTS.items():
        name = ck.weight_name(1, mod)
        assert ck.info(name).dtype == tname
        t = reader[ck.gguf_name(name)]
        ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).copy())
        if mod in ("q", "k"):
            ref = reverse_permute_rows(ref, SRC.heads if mod == "q" else SRC.kv_heads)
        W = ck.read(name).float()
        assert torch.equal(W, ref), mod
        m = W.shape[0]
        for a, b in ((0, 1), (5, 13), (7, m), (m - 3, m)):
            assert torch.equal(ck.read_rows(name, a, b).float(), W[a:b]), (mod, a, b)
        # the quantization error is that of the type, not a layout error
        err = float((W - hf[name]).norm() / hf[name].norm())
        assert err < {"Q8_0": 0.01, "F16": 1e-3, "BF16": 0.01}.get(tname, 0.2), (mod, err)


@pytest.mark.parametrize("tname", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_row_reads(tmp_path: Path, tname: str) -> None:
    """K-quants (256-value super-blocks; gguf cannot write them): random blocks with sane scales,
    read by row ranges, equal gguf's dequantization of the whole tensor."""
    qtype = gguf.GGMLQuantizationType[tname]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 12, 512
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if tname == "Q6_K":
        raw[:, :, size - 2 :] = scale  # d at the end
    else:
        raw[:, :, 0:2] = scale  # d, dmin at the start
        raw[:, :, 2:4] = scale
    raw = raw.reshape(rows, -1)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for key, val in (("block_count", 1), ("embedding_length", cols), ("feed_forward_length", 2 * cols), ("attention.head_count", 4)):
        w.add_uint32(f"llama.{key}", val)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((cols, cols), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = GGUFCheckpoint(tmp_path / "k.gguf")
    name = ck.weight_name(0, "up")
    assert ck.info(name).shape == (rows, cols) and ck.info(name).dtype == tname
    ref = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)
    W = ck.read(name)
    assert np.isfinite(ref).all() and torch.equal(W, torch.from_numpy(ref.copy()))
    assert torch.equal(ck.read_rows(name, 4, 9), W[4:9])


def test_permutation_matches_transformers_gguf_loader() -> None:
    """Our un-permutation is transformers' (modeling_gguf_pytorch_utils); permute undoes it."""
    tp = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    proc = tp.LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    rng = np.random.default_rng(1)
    for rows, heads, kv in ((6 * 16, 6, 6), (2 * 16, 6, 2)):
        w = rng.standard_normal((rows, 40)).astype(np.float32)
        ref = proc._reverse_permute_weights(w, heads, kv)
        mine = reverse_permute_rows(torch.from_numpy(w), kv)
        assert torch.equal(mine, torch.from_numpy(np.ascontiguousarray(ref)))
        assert torch.equal(permute_rows(mine, kv), torch.from_numpy(w))


def test_content_hash_and_identity(models: dict[str, Path], tmp_path: Path) -> None:
    ck = GGUFCheckpoint(models["src.q.gguf"])
    name = ck.weight_name(0, "v")  # not permuted: the hash is the stored bytes' hash
    e = ck.entry(name)
    with open(models["src.q.gguf"], "rb") as f:
        f.seek(e.offset)
        raw = f.read(e.nbytes)
    assert ck.content_hash(name) == hashlib.blake2b(raw, digest_size=32).hexdigest()
    assert ck.content_hash(ck.weight_name(0, "q")) != ck.content_hash(ck.weight_name(1, "q"))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(models["src.q.gguf"].read_bytes())
    assert GGUFCheckpoint(copy).identity() == ck.identity()
    assert GGUFCheckpoint(models["src.gguf"]).identity() != ck.identity()


# ---- transfers ------------------------------------------------------------------------------


@pytest.mark.parametrize("source,target", [("src.gguf", "tgt"), ("src", "tgt.gguf"), ("src.gguf", "tgt.gguf")])
def test_transfer_from_gguf_equals_safetensors(models: dict[str, Path], tmp_path: Path, source: str, target: str) -> None:
    ref = run(models, "src", "tgt", tmp_path / "ref")
    got = run(models, source, target, tmp_path / "got")
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(tmp_path / "got")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert [u["energy_retained"] for u in got["units"]] == pytest.approx([u["energy_retained"] for u in ref["units"]], abs=1e-5)
    cfg = json.loads((tmp_path / "got" / CONFIG_NAME).read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_quantized_transfer_equals_dequantized_safetensors(models: dict[str, Path], tmp_path: Path) -> None:
    ref = run(models, "src.deq", "tgt.deq", tmp_path / "ref")
    got = run(models, "src.q.gguf", "tgt.q.gguf", tmp_path / "got")
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(tmp_path / "got")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert len(got["units"]) == len(ref["units"]) == 2 * 7


BIG_SRC = ModelSpec("llama", 1024, 4096, 1, 8, 2, 128, vocab=64)
BIG_TGT = ModelSpec("qwen2", 768, 4096, 1, 6, 2, 128, vocab=64)
LARGEST_F32 = 4 * 4096 * 1024


def test_budget_below_one_dequantized_matrix(tmp_path: Path) -> None:
    """A budget below one dequantized float32 matrix: the GGUF is factored in row blocks read from
    the map, peak working memory stays under the budget, and the result matches the in-core one."""
    src = write_model(tmp_path / "src", BIG_SRC, dtype="float32", seed=3)
    tgt = write_model(tmp_path / "tgt", BIG_TGT, dtype="float32", seed=4)
    ad = write_adapter(tmp_path / "ad", BIG_SRC, rank=8, alpha=16, seed=5, modules=("q", "gate", "down"))
    m = {"adapter": ad, "src.q.gguf": write_gguf(src, tmp_path / "s.gguf", default="Q8_0"), "tgt.q.gguf": write_gguf(tgt, tmp_path / "t.gguf", default="Q4_0")}
    small, ref = tmp_path / "small", tmp_path / "ref"
    args = [a for a in _cli(m, ref) if a not in ("--out-format", "both")]
    p = run_child(args, timeout=300)
    assert p.returncode == 0, p.stderr
    # --max-memory counts the whole process: its baseline plus 3/4 of one dequantized matrix.
    budget = json.loads((ref / REPORT_NAME).read_text())["summary"]["baseline_host_bytes"] + int(0.75 * LARGEST_F32)
    args = [a for a in _cli(m, small) if a not in ("--out-format", "both")]
    p = run_child([*args, "--max-memory", str(budget)], timeout=300)
    assert p.returncode == 0, p.stderr
    rep = json.loads((small / REPORT_NAME).read_text())
    assert rep["summary"]["peak_host_bytes"] <= budget
    assert "blocked" in {mode for u in rep["units"] for mode in u["mode"].values()}
    a, b = adapter_tensors(ref), adapter_tensors(small)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_basis_cache_with_gguf(models: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run(models, "src.q.gguf", "tgt.q.gguf", tmp_path / "a", rank=8, use_cache=True, cache_dir=str(cache))
    second = run(models, "src.q.gguf", "tgt.q.gguf", tmp_path / "b", rank=8, use_cache=True, cache_dir=str(cache))
    assert first["summary"]["cache"]["stored"] > 0
    assert second["summary"]["cache"]["hits"] == first["summary"]["cache"]["stored"]
    assert adapter_tensors(tmp_path / "a").keys() == adapter_tensors(tmp_path / "b").keys()
    for k, v in adapter_tensors(tmp_path / "a").items():
        assert torch.equal(v, adapter_tensors(tmp_path / "b")[k])


# ---- the LoRA GGUF --------------------------------------------------------------------------


def read_lora_gguf(path: Path) -> tuple[dict[str, object], dict[str, tuple[str, tuple[int, ...], np.ndarray]]]:
    r = gguf.GGUFReader(path)
    meta = {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type.name == "BF16":
            data = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
        tensors[t.name] = (t.tensor_type.name, tuple(int(d) for d in t.shape.tolist()), np.asarray(data, dtype=np.float32))
    return meta, tensors


@pytest.mark.parametrize("target", ["src", "src.gguf"])
def test_lora_gguf_layout_llama_target(models: dict[str, Path], tmp_path: Path, target: str) -> None:
    """llama target (safetensors or GGUF): names, ne shapes, metadata, lora_b of q/k permuted as
    llama.cpp permutes the base q/k, everything else the PEFT tensors as they are."""
    out = tmp_path / "out"
    lowmem_crosslora.transfer(models["adapter"], models["src"], models[target], out, rank=320, device="cpu", use_cache=False, out_format="both")
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_NAME, CONFIG_NAME, REPORT_NAME, GGUF_NAME])
    meta, tensors = read_lora_gguf(out / GGUF_NAME)
    assert meta["general.architecture"] == "llama"
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    peft = adapter_tensors(out)
    assert len(tensors) == 2 * len(peft) // 2 == 2 * SRC.layers * 7
    for layer in range(SRC.layers):
        for mod, hf in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("down", "mlp.down_proj")):
            gname = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "down": "ffn_down"}[mod]
            A = peft[f"base_model.model.model.layers.{layer}.{hf}.lora_A.weight"]
            B = peft[f"base_model.model.model.layers.{layer}.{hf}.lora_B.weight"]
            ta, sa, da = tensors[f"blk.{layer}.{gname}.weight.lora_a"]
            tb, sb, db = tensors[f"blk.{layer}.{gname}.weight.lora_b"]
            assert ta == tb == "F32"
            assert sa == (A.shape[1], A.shape[0]) and sb == (B.shape[1], B.shape[0])  # GGUF ne: reversed
            assert np.array_equal(da, A.numpy())
            expect = permute_rows(B, {"q": SRC.heads, "k": SRC.kv_heads}[mod]) if mod in ("q", "k") else B
            assert np.array_equal(db, expect.numpy()), (layer, mod)
    if target == "src.gguf":
        # The delta in GGUF row order is the permuted delta: what llama.cpp adds to its permuted q.
        ck = GGUFCheckpoint(models["src.gguf"])
        e = ck.entry(ck.weight_name(0, "q"))
        _, _, da = tensors["blk.0.attn_q.weight.lora_a"]
        _, _, db = tensors["blk.0.attn_q.weight.lora_b"]
        B = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        A = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        assert np.allclose(db @ da, permute_rows(B @ A, SRC.heads).numpy(), atol=1e-6)
        assert e.gguf_name == "blk.0.attn_q.weight"


def test_gguf_only_output_qwen2_from_gguf_target(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    rep = lowmem_crosslora.transfer(
        models["adapter"], models["src.q.gguf"], models["tgt.q.gguf"], out, rank=16, device="cpu", use_cache=False, out_format="gguf", dtype="bfloat16"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_NAME, REPORT_NAME])
    assert rep["options"]["out_format"] == "gguf"
    meta, tensors = read_lora_gguf(out / GGUF_NAME)
    assert meta["general.architecture"] == "qwen2"
    ta, sa, _ = tensors["blk.1.ffn_down.weight.lora_a"]
    tb, sb, _ = tensors["blk.1.ffn_down.weight.lora_b"]
    assert ta == tb == "BF16" and sa == (TGT.intermediate, 4) and sb == (4, TGT.hidden)
    # qwen2 is not permuted: B @ A is the PEFT delta in both files
    both = tmp_path / "both"
    lowmem_crosslora.transfer(
        models["adapter"], models["src.q.gguf"], models["tgt.q.gguf"], both, rank=16, device="cpu", use_cache=False, out_format="both", dtype="bfloat16"
    )
    peft = adapter_tensors(both)
    _, _, db = tensors["blk.0.attn_q.weight.lora_b"]
    assert np.array_equal(db, peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float().numpy())


def test_inspect_reads_the_lora_gguf_we_write(models: dict[str, Path], tmp_path: Path) -> None:
    from lowmem_crosslora.commands.inspect import describe

    out = tmp_path / "out"
    lowmem_crosslora.transfer(models["adapter"], models["src.q.gguf"], models["tgt.q.gguf"], out, rank=16, device="cpu", use_cache=False, out_format="gguf")
    d = describe(out / GGUF_NAME)
    meta, tensors = read_lora_gguf(out / GGUF_NAME)
    assert d["kind"] == "lora-gguf" and d["architecture"] == meta["general.architecture"] == "qwen2" and d["adapter_type"] == "lora"
    assert d["lora_modules"] * 2 == len(tensors) and d["unpaired"] == [] and d["ranks"] == [4]
    assert d["layers"] == f"0..{TGT.layers - 1} ({TGT.layers})" and "ffn_down" in d["modules"]


def test_per_module_scales_fold_into_lora_b(models: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp has one alpha: rsLoRA and alpha_pattern scales are folded into lora_b."""
    ad = tmp_path / "ad"
    write_adapter(ad, SRC, rank=4, alpha=8, seed=3, base="x")
    cfg = json.loads((ad / CONFIG_NAME).read_text())
    cfg["use_rslora"] = True
    cfg["alpha_pattern"] = {"model.layers.1.self_attn.v_proj": 2.0}
    (ad / CONFIG_NAME).write_text(json.dumps(cfg))
    out = tmp_path / "out"
    lowmem_crosslora.transfer(ad, models["src"], models["tgt"], out, rank=320, device="cpu", use_cache=False, out_format="both")
    meta, tensors = read_lora_gguf(out / GGUF_NAME)
    peft = adapter_tensors(out)
    alpha = float(meta["adapter.lora.alpha"])
    for layer, alpha_m in ((0, 8.0), (1, 2.0)):
        B = peft[f"base_model.model.model.layers.{layer}.self_attn.v_proj.lora_B.weight"].numpy()
        _, _, db = tensors[f"blk.{layer}.attn_v.weight.lora_b"]
        peft_scale = alpha_m / np.sqrt(4)
        llama_scale = alpha / 4
        np.testing.assert_allclose(llama_scale * db, peft_scale * B, rtol=1e-6, atol=1e-8)


# ---- resume and bad input -------------------------------------------------------------------


def _cli(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *command("transfer"), "--adapter", str(models["adapter"]),
        "--source", str(models["src.q.gguf"]), "--target", str(models["tgt.q.gguf"]), "--out", str(out),
        "--device", "cpu", "--rank", "8", "--quiet", "--no-cache", "--out-format", "both", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("kill", ["after_unit:5", "finish:0"])
def test_resume_with_gguf_inputs_and_output(models: dict[str, Path], tmp_path: Path, kill: str) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    p = run_child(_cli(models, ref), timeout=300)
    assert p.returncode == 0, p.stderr
    p = run_child(_cli(models, out), kill=kill, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists() or not any(out.iterdir())
    p = run_child(_cli(models, out), timeout=300)
    assert p.returncode == 0, p.stderr
    for name in (ADAPTER_NAME, GGUF_NAME):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    rep = json.loads((out / REPORT_NAME).read_text())
    assert rep["summary"]["resumed_units"] >= (6 if kill.startswith("after_unit") else 14)


def test_missing_gguf_package_is_one_line(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    args = ["transfer", "--adapter", str(models["adapter"]), "--source", str(models["src.gguf"]), "--target", str(models["tgt"])]
    code, _out, err = run_cli([*args, "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "lowmem-crosslora[gguf]" in err
    args = ["transfer", "--adapter", str(models["adapter"]), "--source", str(models["src"]), "--target", str(models["tgt"])]
    code, _out, err = run_cli([*args, "--out", str(tmp_path / "o2"), "--device", "cpu", "--quiet", "--out-format", "gguf"], capsys)
    assert code == 2 and "lowmem-crosslora[gguf]" in err and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "arch"])
def test_bad_gguf_is_one_line(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    bad = tmp_path / "bad.gguf"
    data = models["src.gguf"].read_bytes()
    if damage == "garbage":
        bad.write_bytes(b"not a gguf file at all" * 10)
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:
        w = gguf.GGUFWriter(str(bad), "mamba")
        w.add_tensor("blk.0.ssm_in.weight", np.zeros((4, 32), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    args = ["transfer", "--adapter", str(models["adapter"]), "--source", str(bad), "--target", str(models["tgt"])]
    code, _out, err = run_cli([*args, "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert {"garbage": "GGUF", "truncated": "truncated", "arch": "mamba"}[damage] in err


def test_plan_and_inspect_take_gguf(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["inspect", str(models["tgt.q.gguf"]), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["model_type"] == "qwen2" and info["layers"] == 2 and info["dtypes"]["Q8_0"] == 4
    args = ["plan", "--adapter", str(models["adapter"]), "--source", str(models["src.q.gguf"]), "--target", str(models["tgt.q.gguf"]), "--json"]
    code, out, err = run_cli([*args, "--device", "cpu"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["units"]) == 14


def test_batch_of_adapters_with_gguf_in_and_out(models: dict[str, Path], tmp_path: Path) -> None:
    """Several adapters in one run on GGUF models, GGUF-only outputs; a rerun keeps the finished ones."""
    ad2 = write_adapter(tmp_path / "ad2", SRC, rank=4, alpha=8, seed=7, base="x")
    pairs = [(models["adapter"], tmp_path / "o1"), (ad2, tmp_path / "o2")]
    kw = {"rank": 8, "device": "cpu", "use_cache": False, "out_format": "gguf"}
    reps = lowmem_crosslora.transfer_batch(pairs, models["src.q.gguf"], models["tgt.q.gguf"], **kw)
    assert len(reps) == 2
    for _, out in pairs:
        assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_NAME, REPORT_NAME])
    alone = lowmem_crosslora.transfer(ad2, models["src.q.gguf"], models["tgt.q.gguf"], tmp_path / "alone", **kw)
    assert (tmp_path / "alone" / GGUF_NAME).read_bytes() == (tmp_path / "o2" / GGUF_NAME).read_bytes()
    assert alone["units"][0]["uid"] == reps[1]["units"][0]["uid"]
    again = lowmem_crosslora.transfer_batch(pairs, models["src.q.gguf"], models["tgt.q.gguf"], **kw)
    assert [r["run_fingerprint"] for r in again] == [r["run_fingerprint"] for r in reps]
