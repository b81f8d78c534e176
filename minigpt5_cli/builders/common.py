"""What every builder shares: the cache the named backbones are built into, and the CLIP tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from minigpt5_cli import files

VERSION = "2"  # bump when a builder changes, so stale caches are not reused


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT5_CACHE", Path.home() / ".cache" / "minigpt5")) / "tiny"


def cached(name: str, build: Callable[[str, Path], object]) -> str:
    """The cache folder of backbone `name`, built first with `build(name, folder)` if needed. Several
    processes may build it at once: the first folder to land is kept."""
    target = cache_dir() / f"{name.replace(':', '-')}-v{VERSION}"
    if not target.exists():
        with files.staged(target, keep=True) as tmp:
            build(name, tmp)
    return str(target)


def clip_tokenizer(max_length: int, words: list[str] = ()):
    """A CLIP tokenizer over the byte alphabet, with and without `</w>`. With `words`, BPE merges
    learnt on them make each of those words one token; other text falls back to characters."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = []
    if words:
        bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.Whitespace()
        bpe.train_from_iterator(words, trainers.BpeTrainer(vocab_size=5000, end_of_word_suffix="</w>",
                                                           show_progress=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
        for merge in merges:
            vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=max_length)
