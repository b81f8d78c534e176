"""The batched decoder: samples text from the LLM, with each voken group forced in one cached step.

When a row samples `[IMG0]`, the whole voken group is fed in one forward step on the KV cache; the
states at the training positions (the one that predicted `[IMG0]`, then `[IMG0]..[IMG{n-2}]`) are
kept, and decoding goes on, so a response may hold several images.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from minigpt5_cli.errors import UserError
from minigpt5_cli.generation.settings import Settings
from minigpt5_cli.modeling.model import MiniGPT5

STOP = "###"  # the paper's turn marker: a response ends where it starts
STOP_WINDOW = 8  # tokens decoded together when looking for STOP, which may span several tokens


@dataclass
class _Row:
    ids: list[int]  # prompt and response so far, for the repetition penalty
    generator: torch.Generator
    text: list[int] = dataclasses.field(default_factory=list)  # text tokens since the last image
    segments: list[dict] = dataclasses.field(default_factory=list)  # {"text": str} or {"image": i}
    images: int = 0
    new: int = 0  # tokens fed after the prompt
    done: bool = False
    pending: dict | None = None  # the image segment whose voken group is being fed


class Decoder:
    """Batched sampling with voken groups forced in one cached forward step."""

    def __init__(self, model: MiniGPT5, settings: Settings):
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopPLogitsWarper)

        settings = settings.resolve(model.recipe.sample)
        self.model, self.s = model, settings
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
        self.prefix = model.recipe.adapter.kind == "prefix"
        self.virtual = model.recipe.adapter.virtual_tokens if self.prefix else 0
        # PEFT's prefix forward always rebuilds the cache, so with a cache of our own we call the base model.
        self.forward_fn = model.llm.get_base_model() if self.prefix else model.llm
        base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        # transformers renamed `past_key_values` to `cache` during 5.x.
        self.cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.calls: list[int] = []  # tokens per forward call, for inspection

    def _forward(self, ids, mask, cache, **extra):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.forward_fn(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              output_hidden_states=True, logits_to_keep=1, **{self.cache_arg: cache}, **extra)
        self.calls.append(ids.shape[1])
        return out.logits[:, -1].float(), out.hidden_states[-1], out[self.cache_arg]

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        scores = logits[None].clone()
        vokens = slice(self.first, self.first + self.n)
        room = self.s.max_new_tokens - row.new
        if self.s.mode == "two-stage" or room < self.n:
            scores[:, vokens] = float("-inf")
        else:
            scores[:, self.first + 1:self.first + self.n] = float("-inf")  # only [IMG0] opens a group
        scores = self.warpers(torch.tensor([row.ids], device=scores.device), scores)
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
        if token == self.tok.eos_token_id:
            return True
        return STOP in self.tok.decode(row.text[-STOP_WINDOW:] + [token], skip_special_tokens=True)

    @torch.inference_mode()
    def __call__(self, prompts: list[tuple[list[int], torch.Tensor | None]], seeds: list[int],
                 on_tokens=None) -> tuple[list[list[dict]], torch.Tensor]:
        """Decode one response per prompt. Returns each row's segments, whose image entries index
        into the returned voken states (images, n, llm_width)."""
        pad = self.tok.pad_token_id
        width = max(len(ids) for ids, _ in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in prompts], device=self.device)
        rows = [_Row(ids=list(p), generator=torch.Generator(self.device).manual_seed(seed))
                for (p, _), seed in zip(prompts, seeds)]
        extra = {}
        pixels = [pv for _, pv in prompts if pv is not None]
        if pixels:
            extra["pixel_values"] = torch.cat(pixels).to(self.device, self.model.llm.dtype)
        cache = None
        if self.prefix:
            mask = torch.cat([mask.new_ones(len(rows), self.virtual), mask], dim=1)
            cache = self.model.llm.get_prompt(len(rows))
        self.calls = []
        logits, hidden, cache = self._forward(ids, mask, cache, **extra)
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
                row.ids += chunks[-1]
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
            mask = torch.cat([mask, step_mask], dim=1)
            logits, hidden, cache = self._forward(step, mask, cache)
            for r, row in enumerate(rows):
                if row.pending is not None:  # a voken group fills its chunk: positions 0..n-1
                    states.append(torch.cat([last[r:r + 1], hidden[r, :self.n - 1]]))
                    row.pending["image"], row.pending = len(states) - 1, None
            last = torch.where(step_mask[:, -1:].bool(), hidden[:, -1], last)
        for row in rows:
            if row.text:
                self._close_text(row)
        out = torch.stack(states) if states else hidden.new_zeros(0, self.n, hidden.shape[-1])
        return [row.segments for row in rows], out
