"""The renderer: one batched diffusion call for many images, each with its own seeded noise, with
classifier-free guidance against the mapper's output for null voken states."""

from __future__ import annotations

import torch

from minigpt5_cli.generation.settings import Settings
from minigpt5_cli.modeling.model import MiniGPT5


class Renderer:
    """One batched diffusion call for many images, each with its own seeded noise."""

    def __init__(self, model: MiniGPT5, settings: Settings):
        self.model, self.s = model, settings.resolve(model.recipe.sample)
        self.pipe = model.gen_info.pipeline()
        self.size = settings.image_size or model.gen_info.resolution
        self.device = model.vokens.rows_in.device

    @torch.inference_mode()
    def __call__(self, seeds: list[int], states: torch.Tensor | None = None, captions: list[str] | None = None,
                 on_step=None) -> list:
        if not seeds:
            return []
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        kwargs = {}
        if captions is not None:
            kwargs["prompt"] = captions
        else:
            mapper = self.model.mapper
            kwargs["prompt_embeds"] = mapper(states.float())
            # The negative condition is the mapper's output for the null (all-zero) voken states.
            kwargs["negative_prompt_embeds"] = mapper(torch.zeros_like(states[:1].float())).expand(len(seeds), -1, -1)

        def callback(pipe, i, t, tensors):
            if on_step:
                on_step()
            return tensors

        return self.pipe(num_inference_steps=self.s.diffusion_steps, guidance_scale=self.s.guidance_scale,
                         height=self.size, width=self.size, generator=generators, output_type="pil",
                         callback_on_step_end=callback, **kwargs).images
