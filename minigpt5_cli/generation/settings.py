"""generate's settings: the mode, the sampling values (unset ones come from the model recipe), seeds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minigpt5_cli.errors import UserError

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
    min_images: int = 1  # a response that ends with fewer images gets a voken group at its end
    diffusion_steps: int | None = None
    guidance_scale: float | None = None  # 1 or less turns classifier-free guidance off
    image_size: int = 0  # 0: the generator's own resolution
    seed: int = 0
    batch_size: int = 1

    def resolve(self, sample) -> "Settings":
        """These settings with every unset sampling value taken from a recipe's `sample` section."""
        unset = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample) if getattr(self, f.name) is None}
        done = dataclasses.replace(self, **unset)
        done.check()
        return done

    def check(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("steps", "max_new_tokens", "diffusion_steps", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.image_size < 0 or self.image_size % 8:
            raise UserError("--image-size must be a positive multiple of 8 (or 0 for the generator's own)")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0 or \
                self.temperature is not None and self.temperature < 0:
            raise UserError("--repetition-penalty must be above 0, and --temperature at least 0")


SEED_STRIDE = 1_000_003  # a prime: distinct (seed, story, response, image) tuples get distinct seeds


def derive_seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * SEED_STRIDE + p + 1) % (2**63)
    return seed
