"""Training samples: how each stage turns stories into (prompt, target) samples.

- stage 1: every step with an image is a caption pair: prompt = its text (a share of them in
  instruction form), target = the vokens.
- stage 2: for step k of a story, one sample per task in `data.tasks`; the history is the earlier
  steps (text, and images when the LLM accepts them):
    turn           history -> "{text_k} [vokens]", for k >= 1 (MMDialog's turn targets)
    gen            history + "Generate an image with the scene description: {text_k}" -> "[vokens]",
                   every k with an image
    multimodal     history + "Tell me the next scene with image." -> "{text_k} [vokens]", k >= 1
    understanding  history + "Tell me the next scene description by this image: <image k>"
                   -> "{text_k}", k >= 1 with an image; image-text LLMs only
  The vokens are there when step k has an image. A step may also hold a caption of its image
  (the shapes world's do): never shown to the LLM, it is the target of the caption loss, used
  when every target image of a batch has one.
- stage llm (a backbone trained from scratch): the stage-2 samples without vokens, and for rows
  of one step with an image (caption pairs) "Describe this image: <image>" -> "{text}".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from minigpt5_cli import images
from minigpt5_cli.data import prompts
from minigpt5_cli.data.sources import Source
from minigpt5_cli.errors import UserError
from minigpt5_cli.story import Step, Story


@dataclass
class Sample:
    """One training example: a prompt (its history of steps, or a ready text), a target, and the
    target image when the target ends in vokens."""

    history: list[tuple[str, object]] = field(default_factory=list)  # (text, decoded image or None)
    prompt: str | None = None  # a ready prompt, in place of the history (stage 1)
    target: str = ""
    vokens: bool = False  # the target ends with a voken group
    caption: str | None = None  # the caption-loss target
    caption_embed: torch.Tensor | None = None  # ... cached as the text encoders' sequence
    caption_pooled: torch.Tensor | None = None  # ... and pooled vector (SDXL, SD3, FLUX)
    image: torch.Tensor | None = None  # the target image as pixels
    latent: tuple[torch.Tensor, torch.Tensor] | None = None  # ... or as its cached VAE posterior


class TrainSet(torch.utils.data.Dataset):
    """Stage 1: one sample per step with an image. Stage 2: per step, one sample per task. Stage llm:
    stage 2 without vokens, plus captions of one-step rows."""

    def __init__(self, source: Source | list[Story], *, stage: str, resolution: int, history: int, seed: int,
                 instruction_prob: float, images_in_prompt: bool, tasks: tuple[str, ...] | list[str] = ("turn",)):
        if isinstance(source, list):
            source = Source(source, [[s.image is not None for s in st.steps] for st in source])
        self.source, self.stage, self.resolution = source, stage, resolution
        self.history, self.seed, self.instruction_prob = history, seed, instruction_prob
        self.images_in_prompt = images_in_prompt
        self.index = []
        for r, flags in enumerate(source.images):
            for k, has_image in enumerate(flags):
                if stage == "1":
                    if has_image:
                        self.index.append((r, k, "pair"))
                    continue
                if stage == "llm" and len(flags) == 1:
                    if has_image and images_in_prompt:
                        self.index.append((r, k, "caption"))
                    continue
                for task in tasks:
                    if task == "gen" and has_image or task in ("turn", "multimodal") and k >= 1 or \
                            task == "understanding" and k >= 1 and has_image and images_in_prompt:
                        self.index.append((r, k, task))
        if not self.index:
            raise UserError("the training data yields no samples" + (" (stage 1 needs steps with images)"
                                                                      if stage == "1" else ""))

    def __len__(self) -> int:
        return len(self.index)

    def _target(self, step: Step) -> dict:
        """The target image as pixels, or as its cached VAE posterior."""
        if step.cache and step.cache.get("latent_mean") is not None:
            return {"latent": (_tensor(step.cache["latent_mean"]), _tensor(step.cache["latent_logvar"]))}
        return {"image": images.to_pixels(step.image.open(self.resolution), self.resolution)}

    def __getitem__(self, i: int) -> Sample:
        r, k, task = self.index[i]
        steps = self.source[r].steps
        step = steps[k]
        if task == "pair":
            # Decided by the sample's index, not a shared RNG, so resuming replays it exactly.
            instruct = random.Random(f"{self.seed}-{i}").random() < self.instruction_prob
            cache = step.cache or {}
            embed, pooled = cache.get("caption_embed"), cache.get("caption_pooled")
            return Sample(prompt=prompts.INSTRUCTION.format(step.text) if instruct else step.text, vokens=True,
                          caption=step.text, caption_embed=_tensor(embed) if embed is not None else None,
                          caption_pooled=_tensor(pooled) if pooled is not None else None, **self._target(step))
        history = [(s.text, s.image.open() if s.image is not None and self.images_in_prompt else None)
                   for s in steps[max(0, k - self.history):k]]
        sample = Sample(history=history, target=step.text, vokens=step.image is not None and self.stage != "llm")
        if task == "gen":
            history.append((prompts.GEN.format(step.text), None))
            sample.target = ""
        elif task == "multimodal":
            history.append((prompts.NEXT, None))
        elif task == "understanding":
            history.append((prompts.DESCRIBE, step.image.open()))
            sample.vokens = False
        elif task == "caption":
            history[:] = [(prompts.CAPTION, step.image.open())]
        if sample.vokens:
            for key, value in self._target(step).items():
                setattr(sample, key, value)
            sample.caption = step.caption
        return sample


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, dtype=np.float32))
