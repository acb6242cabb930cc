"""Tiny models with offline tokenizers, shared by the verify and refine tests.

The tiny models have no tokenizer of their own; each folder gets one built offline with `tokenizers`:
a character-level one (one token per character, multi-byte characters included) or one that also
merges common letter pairs, so that two models' tokenizations differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

VOCAB = 128
# 3 specials, printable ASCII, newline and tab: the first 101 entries of both tokenizers.
BASE_VOCAB = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n", "\t"]
EXTRA_CHARS = "éèàçöüäñßøåæœ€—“”‘’«»°×µ你好世界"
# The merge tokenizer: one token per ASCII character plus 28 merged letter pairs (128 entries, the models' vocabulary).
MERGES = ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is", "it", "al", "ar", "st", "to"]
MERGES += ["nt", "ng", "se", "ha", "as", "ou"]


def write_bpe_tokenizer(folder: Path, vocab: Sequence[str], merges: Sequence[str] = ()) -> None:
    """A fast BPE tokenizer over `vocab` (id = position) with the two-letter `merges`, saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[(m[0], m[1]) for m in merges], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def write_char_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """One token per character: 3 specials, printable ASCII, newline, tab, a few multi-byte
    characters; exactly `vocab_size` entries so every id the model can sample decodes."""
    vocab = (BASE_VOCAB + list(EXTRA_CHARS))[:vocab_size]
    assert len(vocab) == vocab_size
    write_bpe_tokenizer(folder, vocab)


def write_merge_tokenizer(folder: Path) -> None:
    """One token per ASCII character plus the MERGES letter pairs (VOCAB entries)."""
    vocab = BASE_VOCAB + MERGES
    assert len(vocab) == VOCAB
    write_bpe_tokenizer(folder, vocab, MERGES)


def with_tokenizer(model_dir: Path, dest: Path) -> Path:
    """A copy of a zoo model folder with a character tokenizer (the zoo's own folders stay as other tests expect)."""
    import shutil

    if not dest.exists():
        shutil.copytree(model_dir, dest)
        write_char_tokenizer(dest)
    return dest


def write_tiny(folder: Path, config_cls: str, model_cls: str, seed: int, write_tokenizer: Callable[[Path], None], **config: Any) -> Path:
    """A transformers model of 2 layers, 4 heads (2 KV), VOCAB tokens and random weights (torch seed
    `seed`), saved into `folder` with the tokenizer `write_tokenizer` writes."""
    import transformers

    torch.manual_seed(seed)
    base: dict[str, Any] = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = getattr(transformers, config_cls)(**base, max_position_embeddings=128, tie_word_embeddings=False, **config)
    getattr(transformers, model_cls)(cfg).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_llama(folder: Path, seed: int = 0) -> Path:
    """A tiny llama whose q and o are square (hidden 64 = 4 heads x 16), with weights larger than the
    usual initialisation (std 0.2) so that its next-token distributions are peaked and a LoRA on q and o
    changes them clearly, and a character tokenizer."""
    return write_tiny(folder, "LlamaConfig", "LlamaForCausalLM", seed, write_char_tokenizer, hidden_size=64, intermediate_size=128, initializer_range=0.2)


def write_qwen2(folder: Path, seed: int = 1) -> Path:
    """A tiny qwen2 (hidden 48) with the merge tokenizer."""
    return write_tiny(folder, "Qwen2Config", "Qwen2ForCausalLM", seed, write_merge_tokenizer, hidden_size=48, intermediate_size=96)


def write_lora(model_dir: Path, out: Path, seed: int) -> Path:
    """A random (init_lora_weights=False) rank-8 LoRA on q_proj and o_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), cfg).save_pretrained(out)
    return out


# refine's tests: two short prompts and a few steps on a few short texts, so each run takes seconds.
PROMPTS = ["The weather", "A story:"]
FAST_REFINE: dict[str, Any] = {"steps": 2, "batch": 2, "samples": 4, "contrast_samples": 2, "max_new_tokens": 12, "prompts": PROMPTS, "device": "cpu"}


def refine_pair(root: Path) -> dict[str, Path]:
    """The tiny llama source with a rank-8 q/o LoRA, the qwen2 target, and a prompts file, under `root`."""
    source = write_llama(root / "llama")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "source": source, "adapter": write_lora(source, root / "lora", seed=10), "target": write_qwen2(root / "qwen2"), "prompts": prompts}


def fast_refine(models: dict[str, Path], out: Path, **kw: Any) -> dict[str, Any]:
    """run_refine of the pair with FAST_REFINE's settings (kw overrides them)."""
    from lowmem_crosslora.commands.refine import run_refine

    return run_refine(models["source"], models["adapter"], models["target"], out, **{**FAST_REFINE, **kw})
