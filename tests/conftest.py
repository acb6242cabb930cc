"""Shared fixtures: tiny real checkpoints (transformers' own config and model classes, random
weights, saved as safetensors, single-file and sharded) and real PEFT adapters for them.

Everything is built lazily, once per session, under one session temp folder, so a test run only
pays for the models it uses. Seeds are fixed, so every build is the same on every run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import REPO, repo_env
from bench.crash import command
from lowmem_crosslora.architectures import LLAMA_MODULES

# canonical module (q, k, v, o, gate, up, down) -> its path in a llama-style decoder layer
CANONICAL_TO_NAME = dict(LLAMA_MODULES)
LORA_TARGETS = [path.rsplit(".", 1)[-1] for path in CANONICAL_TO_NAME.values()]  # q_proj ... down_proj
VOCAB = 128
# Fixed token ids for forward passes.
INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 3, 64, 127, 8, 21, 77, 13]])


@dataclass(frozen=True)
class Spec:
    """A tiny model of one family: transformers config class name, model class name, config kwargs."""

    family: str
    config_cls: str
    model_cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"


def _spec(family: str, cfg: str, model: str, dtype: str = "float32", **kw: Any) -> Spec:
    base = {"vocab_size": VOCAB, "max_position_embeddings": 64, "tie_word_embeddings": False}
    base.update(kw)
    return Spec(family, cfg, model, base, dtype)


def _heads(heads: int, kv_heads: int, head_dim: int | None = None) -> dict[str, int]:
    d = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    if head_dim is not None:
        d["head_dim"] = head_dim
    return d


# GQA everywhere (num_key_value_heads < num_attention_heads); gemma2 and qwen3 have
# head_dim != hidden / heads (q out 96 vs hidden 48; q out 128 vs hidden 64).
SPECS: dict[str, Spec] = {
    "llama": _spec("llama", "LlamaConfig", "LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=3, **_heads(4, 2)),
    "llama_wide": _spec("llama", "LlamaConfig", "LlamaForCausalLM", hidden_size=96, intermediate_size=160, num_hidden_layers=4, **_heads(6, 3)),
    "mistral": _spec("mistral", "MistralConfig", "MistralForCausalLM", hidden_size=64, intermediate_size=112, num_hidden_layers=2, **_heads(4, 1)),
    "qwen2": _spec("qwen2", "Qwen2Config", "Qwen2ForCausalLM", hidden_size=48, intermediate_size=96, num_hidden_layers=2, **_heads(4, 2)),
    "qwen3": _spec("qwen3", "Qwen3Config", "Qwen3ForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=2, **_heads(4, 2, 32)),
    "gemma": _spec("gemma", "GemmaConfig", "GemmaForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_heads(4, 1, 16)),
    "gemma2": _spec("gemma2", "Gemma2Config", "Gemma2ForCausalLM", hidden_size=48, intermediate_size=96, num_hidden_layers=3, **_heads(4, 2, 24)),
    "gemma3_text": _spec(
        "gemma3_text",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dtype="bfloat16",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        **_heads(4, 2, 16),
    ),
    # Fused projections: phi3 (qkv_proj, gate_up_proj), gpt_neox (query_key_value, per head), gpt2 (Conv1D c_attn).
    "phi3": _spec("phi3", "Phi3Config", "Phi3ForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=2, pad_token_id=0, **_heads(4, 2)),
    "gpt_neox": _spec("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4),
    "gpt2": _spec("gpt2", "GPT2Config", "GPT2LMHeadModel", n_embd=48, n_layer=2, n_head=4, n_inner=80, n_positions=64),
}
# The LoRA target modules of each family's adapters in the zoo (default: LORA_TARGETS).
FAMILY_TARGETS: dict[str, list[str]] = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def stable_seed(*parts: Any) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def gapped_matrix(m: int, n: int, r: int, gen: np.random.Generator, top: float = 4.0, tail: float = 1e-4) -> np.ndarray:
    """W = U diag(s) V^T with distinct, well separated s_i for i < r and tiny ones after:
    the rank-r singular subspaces (and each of the first r singular vectors) are unique."""
    k = min(m, n)
    U, _ = np.linalg.qr(gen.standard_normal((m, k)))
    V, _ = np.linalg.qr(gen.standard_normal((n, k)))
    s = np.empty(k)
    s[:r] = top * 0.8 ** np.arange(min(r, k))
    if k > r:
        s[r:] = tail * (1.0 - 0.5 * np.arange(k - r) / (k - r))
    return (U * s) @ V.T


def plant_gapped(model: torch.nn.Module, r: int, seed: int) -> None:
    """Replace every q/k/v/o/gate/up/down weight with a gapped matrix (gap after index r)."""
    gen = np.random.default_rng(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.split(".")[-1] in LORA_TARGETS and isinstance(mod, torch.nn.Linear):
                m, n = mod.weight.shape
                mod.weight.copy_(torch.from_numpy(gapped_matrix(m, n, r, gen)).to(mod.weight.dtype))


def make_model(spec: Spec) -> torch.nn.Module:
    import transformers

    cfg = getattr(transformers, spec.config_cls)(**spec.kwargs)
    return getattr(transformers, spec.model_cls)(cfg)


class Zoo:
    """Lazily built, cached checkpoints and adapters for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[tuple[str, int | None], Path] = {}
        self._adapters: dict[str, Path] = {}

    def model(self, name: str, *, sharded: bool = False, gapped: int | None = None) -> Path:
        """Folder of a tiny model: config.json + model.safetensors, or shards with an index."""
        key = (name, gapped)
        if key not in self._models:
            spec = SPECS[name]
            torch.manual_seed(stable_seed("model", name))
            model = make_model(spec)
            if gapped is not None:
                plant_gapped(model, gapped, stable_seed("gap", name, gapped))
            model = model.to(getattr(torch, spec.dtype))
            stem = name if gapped is None else f"{name}-gap{gapped}"
            single = self.root / "models" / stem
            model.save_pretrained(single)
            model.save_pretrained(self.root / "models" / f"{stem}-sharded", max_shard_size="24KB")
            assert (single / "model.safetensors").exists()
            assert (self.root / "models" / f"{stem}-sharded" / "model.safetensors.index.json").exists()
            self._models[key] = single
        single = self._models[key]
        return single.parent / f"{single.name}-sharded" if sharded else single

    def adapter(self, model_name: str, key: str = "default", *, gapped: int | None = None, kind: str = "lora", **peft_kwargs: Any) -> Path:
        """A real PEFT adapter saved by peft for `model_name`. `key` names the variant for the cache."""
        cache_key = f"{model_name}-gap{gapped}-{key}"
        if cache_key in self._adapters:
            return self._adapters[cache_key]
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        base = self.model(model_name, gapped=gapped)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(stable_seed("adapter", cache_key))
        if kind == "lora":
            from peft import LoraConfig

            targets = FAMILY_TARGETS.get(SPECS[model_name].family, LORA_TARGETS)
            kw: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": list(targets), "init_lora_weights": False, "task_type": "CAUSAL_LM"}
            kw.update(peft_kwargs)
            cfg = LoraConfig(**kw)
        elif kind == "ia3":
            from peft import IA3Config

            cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM", **peft_kwargs)
        else:
            raise ValueError(kind)
        pm = get_peft_model(model, cfg)
        out = self.root / "adapters" / cache_key
        pm.save_pretrained(out)
        assert (out / "adapter_model.safetensors").exists()
        self._adapters[cache_key] = out
        return out


CACHE_ENV = "LOWMEM_CROSSLORA_CACHE_DIR"
_cache_root: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Tests never touch the user's basis cache: the default location points into a temporary folder."""
    _cache_root["old"] = os.environ.get(CACHE_ENV)
    _cache_root["path"] = Path(tempfile.mkdtemp(prefix="crosslora-test-caches-"))
    os.environ[CACHE_ENV] = str(_cache_root["path"] / "session")


def pytest_unconfigure(config: pytest.Config) -> None:
    if "path" in _cache_root:
        shutil.rmtree(_cache_root.pop("path"), ignore_errors=True)
        old = _cache_root.pop("old", None)
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    """Each test starts with an empty basis cache of its own, module- and session-scoped fixtures
    that its setup builds included (subprocesses inherit it), so no test sees another's bases."""
    if "path" in _cache_root:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="t-", dir=_cache_root["path"])
    yield


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


# ---- helpers shared by the test modules ------------------------------------------------------


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_weight(model_dir: Path, name: str) -> np.ndarray:
    """One weight of a saved model as float64, found through the index when sharded."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    file = model_dir / (json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors")
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name).to(torch.float64).numpy()


def lora_factors(adapter_dir: Path, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of a PEFT module path such as model.layers.0.self_attn.q_proj, as float64."""
    t = read_tensors(adapter_dir / "adapter_model.safetensors")
    pre = f"base_model.model.{module}"
    return t[f"{pre}.lora_A.weight"].double().numpy(), t[f"{pre}.lora_B.weight"].double().numpy()


def np_fix_signs(U: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent sign convention: the largest-|entry| of each u_i is positive."""
    idx = np.abs(U).argmax(axis=0)
    s = np.sign(U[idx, np.arange(U.shape[1])])
    s[s == 0] = 1
    return U * s, V * s


def np_bases(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 dense rank-r SVD with the sign convention: U (m x r), S (r), V (n x r)."""
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    U, V = np_fix_signs(U[:, :r], Vt[:r].T)
    return U, S[:r], V


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run lowmem_crosslora.cli.main in this process; return (exit code, stdout, stderr)."""
    from lowmem_crosslora.cli import main

    capsys.readouterr()
    code: int | None = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def tree_digest(folder: Path) -> str:
    """SHA-256 over every file's name and bytes under `folder` (a file: its own bytes)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")) if folder.is_dir() else [folder]:
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def refused(args: list[str], capsys: pytest.CaptureFixture[str], inputs: list[Path], out: Path) -> str:
    """Run the CLI expecting a refusal: exit 2, one line on stderr, no traceback, the inputs untouched,
    nothing under or beside `out` (no output, no state folder, no lock). Returns the line."""
    before = [tree_digest(p) for p in inputs]
    code, _out, err = run_cli(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert [tree_digest(p) for p in inputs] == before
    if out.parent.is_dir():
        assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())
    return lines[0]


def run_module(args: list[str], cwd: Path | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run the CLI with ARGS in a fresh process (through bench/crash.py, which installs the fault a test
    sets in LOWMEM_CROSSLORA_TEST_KILL; without one it is `python -m lowmem_crosslora ARGS`)."""
    import subprocess

    p = subprocess.run(command(*args), capture_output=True, text=True, cwd=cwd or REPO, env=repo_env(), timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def peft_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def transfer_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """CLI arguments of a small CPU transfer of inputs["adapter"] from inputs["source"] to inputs["target"]."""
    return [
        "transfer",
        "--adapter",
        str(inputs["adapter"]),
        "--source",
        str(inputs["source"]),
        "--target",
        str(inputs["target"]),
        "--out",
        str(out),
        "--rank",
        "16",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]
