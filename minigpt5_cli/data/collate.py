"""The collator: samples to one right-padded batch of token ids, labels, pixels and targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt5_cli.data import prompts
from minigpt5_cli.data.samples import Sample
from minigpt5_cli.errors import UserError


@dataclass(kw_only=True)
class Collator:
    """Tokenises samples into one right-padded batch; only target tokens carry labels."""

    tokenizer: object
    processor: object | None
    caption_tokenizer: object | None
    first_voken: int
    n_vokens: int
    max_length: int

    @classmethod
    def for_model(cls, model) -> "Collator":
        """The collator that tokenises samples for a MiniGPT5 model, in training and generation alike."""
        return cls(tokenizer=model.tokenizer, processor=model.processor, caption_tokenizer=model.gen_info.tokenizer,
                   first_voken=model.first_voken, n_vokens=model.vokens.n, max_length=model.recipe.data.max_length)

    def _prompt(self, sample: Sample, history: list) -> tuple[str, list]:
        if sample.prompt is not None:
            return sample.prompt, []
        image_token = getattr(self.processor, "image_token", None)
        lines, images = [], []
        for text, img in history:
            if img is not None and image_token:
                lines.append(f"{text} {image_token}".strip())
                images.append(img)
            else:
                lines.append(text)
        return prompts.dialogue(lines), images

    def _encode_prompt(self, text: str, images: list) -> tuple[list[int], torch.Tensor | None]:
        if images:
            enc = self.processor(text=[text], images=images, return_tensors="pt")
            return enc["input_ids"][0].tolist(), enc["pixel_values"]
        return self.tokenizer(text)["input_ids"], None

    def _target_ids(self, sample: Sample) -> list[int]:
        vokens = self.tokenizer.convert_ids_to_tokens(list(range(self.first_voken, self.first_voken + self.n_vokens)))
        text = sample.target
        if sample.vokens:
            text = (text + " " if text else "") + "".join(vokens)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def prompt(self, sample: Sample, room: int) -> tuple[list[int], torch.Tensor | None]:
        """Token ids (and pixel values) of the prompt, dropping the oldest steps to fit `room` tokens."""
        history = list(sample.history)
        while True:
            prompt_ids, pixel_values = self._encode_prompt(*self._prompt(sample, history))
            if len(prompt_ids) <= room or not history:
                break
            history.pop(0)  # the oldest step goes first
        if len(prompt_ids) > room:
            if pixel_values is not None or room < 1:
                raise UserError(f"a sample does not fit data.max_length={self.max_length}; raise it")
            prompt_ids = prompt_ids[:room]
        return prompt_ids, pixel_values

    def encode(self, sample: Sample) -> tuple[list[int], list[int], torch.Tensor | None]:
        target = self._target_ids(sample)
        prompt_ids, pixel_values = self.prompt(sample, self.max_length - len(target))
        labels = [-100] * len(prompt_ids) + [
            -100 if self.first_voken < t < self.first_voken + self.n_vokens else t for t in target
        ]  # [IMG0] is supervised; the rest of the group is forced at inference
        return prompt_ids + target, labels, pixel_values

    def __call__(self, samples: list[Sample]) -> dict:
        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _, _ in encoded)
        pad = self.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in encoded]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab, _ in encoded]),
        }
        pixels = [pv for _, _, pv in encoded if pv is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        targets = [s for s in samples if s.vokens]  # in order: one per voken group
        cached = [s for s in targets if s.latent is not None]
        if cached and len(cached) < len(targets):
            raise UserError("some target images have cached latents and some do not; prepare the data again")
        if cached:
            batch["latent_mean"] = torch.stack([s.latent[0] for s in cached])
            batch["latent_logvar"] = torch.stack([s.latent[1] for s in cached])
        else:
            batch["target_pixels"] = torch.stack([s.image for s in targets]) if targets else torch.zeros(0, 3, 1, 1)
        # The caption loss needs a caption for every target image of the batch.
        captions = [s.caption for s in targets if s.caption is not None]
        if len(captions) < len(targets):
            captions = []
        if captions and all(s.caption_embed is not None for s in targets):
            batch["caption_embeds"] = torch.stack([s.caption_embed for s in targets])
        elif captions:
            batch["caption_ids"] = self.caption_tokenizer(
                captions, padding="max_length", truncation=True, return_tensors="pt",
                max_length=self.caption_tokenizer.model_max_length,
            ).input_ids
        return batch
