"""generate's settings: the mode, the sampling values (unset ones come from the model recipe), seeds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minigpt5_cli.errors import UserError
from minigpt5_cli.recipe import PRECISIONS, RANGES, SampleConfig, in_range

MAX_IMAGE_SIZE = 2048  # pixels a side: SDXL's 1024 with room; 99,992 would need terabytes

MODES = ("vokens", "two-stage")


@dataclass
class Settings:
    mode: str = "vokens"
    steps: int = 1  # responses to generate per story, each appended to the story before the next
    # None: the model recipe's `sample` section (the paper's values unless the recipe says otherwise)
    max_new_tokens: int | None = None
    top_p: float | None = None
    temperature: float | None = None  # 0 decodes greedily
    repetition_penalty: float | None = None
    min_images: int | None = None  # a response that ends with fewer images gets a voken group at its end
    diffusion_steps: int | None = None
    guidance_scale: float | None = None  # 1 or less turns classifier-free guidance off
    penalize: str | None = None  # prompt or response: what the repetition penalty counts
    eos_ids: list[int] | None = None  # empty: the tokenizer's eos and the generation config's
    mask_vokens: bool | None = None
    render: str | None = None  # all or first: the voken groups that become images
    image_size: int = 0  # 0: the generator's own resolution
    seed: int = 0
    batch_size: int = 1

    def resolved(self) -> "Settings":
        """These settings, refused unless `resolve` has filled them (the decoder and renderer need every value)."""
        unset = [f.name for f in dataclasses.fields(SampleConfig) if getattr(self, f.name) is None]
        if unset:
            raise ValueError(f"unresolved settings ({', '.join(unset)}): pass Settings.resolve(recipe.sample)")
        return self

    def resolve(self, sample) -> "Settings":
        """These settings with every unset sampling value taken from a recipe's `sample` section."""
        unset = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample) if getattr(self, f.name) is None}
        done = dataclasses.replace(self, **unset)
        done.check()
        return done

    def check(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for f in dataclasses.fields(SampleConfig):  # the recipe's ranges for the same values
            if getattr(self, f.name) is not None and f"sample.{f.name}" in RANGES:
                in_range(f"--{f.name.replace('_', '-')}", getattr(self, f.name), RANGES[f"sample.{f.name}"])
        for name in ("steps", "batch_size"):
            in_range(f"--{name.replace('_', '-')}", getattr(self, name), (1, math.inf, True))
        in_range("--seed", self.seed, (0, 2**63 - 1, True))
        if self.image_size and (self.image_size % 8 or not 8 <= self.image_size <= MAX_IMAGE_SIZE):
            raise UserError(f"--image-size must be a multiple of 8 from 8 to {MAX_IMAGE_SIZE} (or 0 for the "
                            f"generator's own), got {self.image_size}")


def check_precision(precision: str | None) -> None:
    """--precision: None for the recipe's."""
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
