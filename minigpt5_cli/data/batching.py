"""Length-grouped batches (`data.group_by_length`), as in Hugging Face's Trainer: each epoch the samples
are shuffled, cut into mega-batches, and each mega-batch sorted longest first, so that a micro-batch
holds samples of about one length and little padding. The mega-batch that holds the longest sample
goes first: a batch too large for the device fails at the first step, not hours in.

The shuffle is the one the plain loader makes (accelerate's seedable sampler: `torch.randperm` seeded
with train.seed + the epoch), so the order follows from the epoch alone and a resumed run takes the
batches an uninterrupted one takes. A mega-batch is MULT optimizer steps' samples (micro-batch x
processes x accumulation steps): N processes with A accumulation steps and one process with N x A cut
the same mega-batches, and accelerate deals each one's micro-batches out in turn (process r takes
r, r + N, ...), so both train on the same samples in the same steps.

A sample's length is estimated without decoding an image or rendering its prompt: the characters
of the step texts it holds (prompt and target) at the tokenizer's characters per token, measured
on the first rows, plus the tokens of the prompt's frame and its task's request, those the
processor writes for each image in the prompt, the vokens and the end token; at most
data.max_length, as the collator cuts it.
"""

from __future__ import annotations

import torch

from minigpt5_cli.data import prompts
from minigpt5_cli.data.samples import Sample, TrainSet
from minigpt5_cli.data.sources import Source, step_field
from minigpt5_cli.recipe import TrainConfig

MULT = 50  # optimizer steps per mega-batch, as the Trainer's 50 (fewer on a small data set)
CALIBRATION_ROWS = 64  # rows whose texts measure the tokenizer's characters per token
# What each task asks in its prompt, beside the steps' texts (TrainSet)
ASKS = {"gen": prompts.GEN.format(""), "multimodal": prompts.NEXT, "understanding": prompts.DESCRIBE,
        "caption": prompts.CAPTION}


class GroupedSampler(torch.utils.data.Sampler):
    """Sample indices in length-grouped order for training as `t` says on `processes` processes, for
    epoch `set_epoch(e)` (accelerate's prepared loader calls it through its batch sampler)."""

    def __init__(self, lengths: list[int], t: TrainConfig, processes: int):
        self.lengths, self.seed, self.epoch = lengths, t.seed, 0
        self.step = t.batch_size * processes * t.grad_accum

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(grouped(self.lengths, self.step, self.seed + self.epoch))


def grouped(lengths: list[int], step: int, seed: int) -> list[int]:
    """Indices of `lengths` shuffled with `seed`, in mega-batches of MULT x `step` (an optimizer step's
    samples; fewer steps when the data holds under 4 mega-batches of MULT, as the Trainer does), each
    sorted longest first (ties keep their shuffled order), the one with the longest sample first."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    size = step * max(1, min(MULT, len(lengths) // (4 * step)))
    megas = [sorted(order[i:i + size], key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
    longest = max(range(len(megas)), key=lambda m: lengths[megas[m][0]])
    megas.insert(0, megas.pop(longest))
    return [i for mega in megas for i in mega]


def lengths(dataset: TrainSet, collate) -> list[int]:
    """Each sample's estimated token count (see the module's docstring), in `dataset`'s order."""
    source, history = dataset.source, dataset.history
    per_char = _tokens_per_char(source, collate.tokenizer)
    tokens = [[round(c * per_char) for c in row] for row in _chars(source)]
    frame, image = _prompt_tokens(collate)
    image *= dataset.images_in_prompt
    asks = {task: len(collate.tokenizer(text, add_special_tokens=False)["input_ids"]) for task, text in ASKS.items()}
    out = []
    for r, k, task in dataset.index:
        texts, flags = tokens[r], source.images[r]
        n = texts[k] + 1  # its own text (the target, or in the gen task the request), and the end token
        if task != "pair":  # a ready text in stage 1; else a dialogue, with the earlier steps as TrainSet writes them
            n += frame + asks.get(task, 0)
        if task not in ("pair", "caption"):
            n += sum(texts[j] + image * flags[j] for j in range(max(0, k - history), k))
        if task in ("understanding", "caption"):
            n += image
        if task == "pair" or flags[k] and dataset.stage != "llm" and task != "understanding":
            n += collate.n_vokens
        out.append(min(n, collate.max_length))
    return out


def _chars(source: Source) -> list[list[int]]:
    """Characters of each row's step texts, a continuation set's target last, read from the Arrow
    columns of a prepared dataset (no image is copied or decoded)."""
    import pyarrow.compute as pc

    rows = source.rows
    if hasattr(rows, "parts"):  # several sources, one after the other
        return [c for part in rows.parts for c in _chars(part)]
    if not hasattr(rows, "ds"):  # stories read from JSON Lines
        return [[len(s.text) for s in source[i].steps] for i in range(len(source))]
    ds = rows.ds
    chars = step_field(ds, "text", pc.utf8_length)
    if "target" in ds.column_names:
        target = [n for chunk in ds.data.table.column("target").chunks
                  for n in pc.utf8_length(pc.struct_field(chunk, "text")).to_pylist()]
        chars = [row + [n] for row, n in zip(chars, target)]
    return chars


def _tokens_per_char(source: Source, tokenizer) -> float:
    texts = [s.text for i in range(min(CALIBRATION_ROWS, len(source))) for s in source[i].steps if s.text]
    chars = sum(map(len, texts))
    if not chars:
        return 0.25
    return sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])) / chars


def _prompt_tokens(collate) -> tuple[int, int]:
    """The tokens of a dialogue prompt's frame (the template around its text), and those the processor
    writes for one image in it (a 512-pixel square: a processor that tiles by size writes more or
    fewer for other sizes)."""
    from PIL import Image

    def width(image) -> int:
        return collate.prompt(Sample(history=[("a", image)]), collate.max_length * 4)["input_ids"].shape[1]

    text = width(None)
    frame = text - len(collate.tokenizer("a", add_special_tokens=False)["input_ids"])
    return frame, max(0, width(Image.new("RGB", (512, 512), (128, 128, 128))) - text)
