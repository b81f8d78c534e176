"""The batched decoder: samples text from the LLM, with each voken group forced in one cached step.

When a row samples `[IMG0]`, the whole voken group is fed in one forward step on the KV cache; the
states at the training positions (the one that predicted `[IMG0]`, then `[IMG0]..[IMG{n-2}]`) are
kept, and decoding goes on, so a response may hold several images. The model's runner
(`modeling/runner.py`) feeds the prompts and every step; this module decides what to feed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from minigpt5_cli.data.collate import Collator
from minigpt5_cli.errors import UserError
from minigpt5_cli.generation.settings import Settings
from minigpt5_cli.modeling.model import MiniGPT5
from minigpt5_cli.recipe import DataConfig

STOP = "###"  # the paper's turn marker: a response ends where it starts
STOP_WINDOW = 8  # tokens decoded together when looking for STOP, which may span several tokens


@dataclass
class _Row:
    ids: list[int]  # the tokens the repetition penalty counts: the prompt and response so far
    generator: torch.Generator
    text: list[int] = dataclasses.field(default_factory=list)  # text tokens since the last image
    segments: list[dict] = dataclasses.field(default_factory=list)  # {"text": str} or {"image": i}
    images: int = 0
    new: int = 0  # tokens fed after the prompt
    done: bool = False
    pending: dict | None = None  # the image segment whose voken group is being fed


class Decoder:
    """Batched sampling with voken groups forced in one cached forward step."""

    def __init__(self, model: MiniGPT5, data: DataConfig, settings: Settings):
        """`data`: how the model's prompts are written (its recipe's); `settings`: resolved ones."""
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopPLogitsWarper)

        self.model, self.s = model, settings.resolved()
        self.n, self.first = model.vokens.n, model.first_voken
        self.tok = model.tokenizer
        if settings.mode == "vokens" and settings.min_images * self.n > settings.max_new_tokens:
            raise UserError(f"--max-new-tokens {settings.max_new_tokens} leaves no room for --min-images "
                            f"{settings.min_images} groups of {self.n} vokens")
        self.device = model.vokens.rows_in.device
        warpers = [RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)] \
            if settings.repetition_penalty != 1 else []
        if settings.temperature > 0:
            warpers += [TemperatureLogitsWarper(settings.temperature), TopPLogitsWarper(settings.top_p)]
        self.warpers = LogitsProcessorList(warpers)
        self.data = data
        self.collator = Collator.for_model(model, data)
        # generate's stop tokens: eos, and the end of turn of chat models (generation_config may list several);
        # or the recipe's own (the released model stops at id 1)
        config = model.llm_info.model.generation_config
        stops = getattr(config, "eos_token_id", None)
        self.stop_ids = set(self.s.eos_ids) or \
            {self.tok.eos_token_id, *(stops if isinstance(stops, list) else [stops] if stops else [])}
        # penalize=response counts what transformers' generate counts when fed the prompt as embeddings (as the
        # released code was): the sequence it starts, the generation config's BOS (0 for Vicuna v0, not the
        # tokenizer's 1), then the sampled tokens
        bos = getattr(config, "bos_token_id", None)
        bos = bos if bos is not None else self.tok.bos_token_id
        self.start = [] if bos is None else [bos]

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        scores = logits[None].clone()
        vokens = slice(self.first, self.first + self.n)
        room = self.s.max_new_tokens - row.new
        if self.s.mode == "two-stage" or room < self.n:
            scores[:, vokens] = float("-inf")
        elif self.s.mask_vokens:
            scores[:, self.first + 1:self.first + self.n] = float("-inf")  # only [IMG0] opens a group
        scores = self.warpers(torch.tensor([row.ids], dtype=torch.long, device=scores.device), scores)
        if self.s.temperature <= 0:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _close_text(self, row: _Row) -> None:
        text = self.tok.decode(row.text, skip_special_tokens=True).split(STOP)[0].strip()
        if text:
            row.segments.append({"text": text})
        row.text = []

    def _stops(self, row: _Row, token: int) -> bool:
        if token in self.stop_ids:
            return True
        return STOP in self.tok.decode(row.text[-STOP_WINDOW:] + [token], skip_special_tokens=True)

    @torch.inference_mode()
    def __call__(self, prompts: list[dict[str, torch.Tensor]], seeds: list[int],
                 on_tokens=None) -> tuple[list[list[dict]], torch.Tensor]:
        """Decode one response per prompt (its model inputs, as `Collator.prompt` gives them). Returns
        each row's segments, whose image entries index into the returned voken states
        (images, n, llm_width)."""
        pad = self.tok.pad_token_id
        runner = self.model.runner
        batch = {k: v.to(self.device) for k, v in self.collator.merge(prompts, left=True).items()}
        rows = [_Row(ids=p["input_ids"][0].tolist() if self.s.penalize == "prompt" else list(self.start),
                     generator=torch.Generator(self.device).manual_seed(seed)) for p, seed in zip(prompts, seeds)]
        logits, hidden, decoding = runner.start(batch, self.s.max_new_tokens)
        last = hidden[:, -1]
        states: list[torch.Tensor] = []
        vokens = list(range(self.first, self.first + self.n))
        while True:
            chunks: list[list[int]] = []
            for r, row in enumerate(rows):
                if row.done:
                    chunks.append([])
                    continue
                owed = self.n * max(0, self.s.min_images - row.images) if self.s.mode == "vokens" else 0
                room = self.s.max_new_tokens - row.new
                token = self.first if owed and room <= owed else self._pick(row, logits[r])  # the last room is owed
                if self._stops(row, token):
                    if owed:
                        token = self.first  # the response may not end without its images
                    else:
                        row.done = True
                        self._close_text(row)
                        chunks.append([])
                        continue
                if token == self.first:
                    self._close_text(row)
                    row.pending = {"image": None}  # filled once the group's states exist
                    row.segments.append(row.pending)
                    row.images += 1
                    chunks.append(vokens)
                else:
                    row.text.append(token)
                    chunks.append([token])
                row.ids += chunks[-1] if self.s.penalize == "prompt" else [token]  # the forced vokens, or not
                row.new += len(chunks[-1])
                if row.new >= self.s.max_new_tokens:
                    row.done = True
                    if token != self.first:
                        self._close_text(row)
            if all(row.done and row.pending is None for row in rows):
                break  # nothing left to sample, and no voken group whose states are needed
            if on_tokens:
                on_tokens(sum(map(len, chunks)))
            w = max(map(len, chunks))
            # Shorter chunks are left-padded with masked holes, so every row's newest token is last.
            step = torch.tensor([[pad] * (w - len(c)) + c for c in chunks], device=self.device)
            step_mask = torch.tensor([[0] * (w - len(c)) + [1] * len(c) for c in chunks], device=self.device)
            logits, hidden = runner.step(decoding, step, step_mask)
            for r, row in enumerate(rows):
                if row.pending is not None:  # a voken group fills its chunk: positions 0..n-1
                    states.append(torch.cat([last[r:r + 1], hidden[r, :self.n - 1]]))
                    row.pending["image"], row.pending = len(states) - 1, None
            last = torch.where(step_mask[:, -1:].bool(), hidden[:, -1], last)
        for row in rows:
            if row.text:
                self._close_text(row)
            if self.s.render == "first":  # later groups were decoded through, as text goes on, not rendered
                first = next((seg for seg in row.segments if "image" in seg), None)
                row.segments = [seg for seg in row.segments if "image" not in seg or seg is first]
        out = torch.stack(states) if states else hidden.new_zeros(0, self.n, hidden.shape[-1])
        return [row.segments for row in rows], out
