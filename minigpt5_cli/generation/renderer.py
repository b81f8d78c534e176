"""The renderer: one batched diffusion call for many images, each with its own seeded noise, with
classifier-free guidance against the mapper's output for null voken states."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from minigpt5_cli import display
from minigpt5_cli.errors import UserError
from minigpt5_cli.generation.settings import Settings
from minigpt5_cli.modeling.model import MiniGPT5


class Renderer:
    """One batched diffusion call for many images, each with its own seeded noise, through the
    generator's own pipeline."""

    def __init__(self, model: MiniGPT5, settings: Settings):
        """`settings`: resolved ones."""
        self.model, self.s = model, settings.resolved()
        self.generator = model.generator
        self.size = settings.image_size or model.generator.resolution
        step = self.generator.size_step
        if self.size % step:
            raise UserError(f"--image-size must be a multiple of {step} for this {self.generator.family} generator, "
                            f"got {self.size}")
        self.device = model.vokens.rows_in.device

    @torch.inference_mode()
    def __call__(self, seeds: list[int], states: torch.Tensor | None = None, captions: list[str] | None = None,
                 on_step=None) -> list:
        if not seeds:
            return []

        def callback(pipe, i, t, tensors):
            if on_step:
                on_step()
            return tensors

        common = dict(num_inference_steps=self.s.diffusion_steps, guidance_scale=self.s.guidance_scale,
                      height=self.size, width=self.size, callback_on_step_end=callback,
                      generator=[torch.Generator(self.device).manual_seed(s) for s in seeds])
        if captions is not None:
            with self._counting_cuts(captions):
                return self.generator.render_text(captions, **common)
        seq, pooled = self.model.mapper(states.float())
        # The negative condition is the mapper's output for the null (all-zero) voken states.
        null_seq, null_pooled = self.model.mapper(torch.zeros_like(states[:1].float()))
        dtype = self.generator.denoiser.dtype
        cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
        return self.generator.render(cast(seq), cast(pooled), cast(null_seq.expand(len(seeds), -1, -1)),
                                     cast(None if null_pooled is None else null_pooled.expand(len(seeds), -1)),
                                     **common)

    @contextmanager
    def _counting_cuts(self, captions: list[str]):
        """The pipeline warns of each caption CLIP cuts, a line per batch or prompt: those are counted
        and said once, at the end of the run (`display.tally`)."""
        tok = self.generator.tokenizer
        limit = tok.model_max_length
        cut = sum(len(ids) > limit for ids in tok(captions, verbose=False)["input_ids"])
        loggers = [logging.getLogger(type(self.generator.pipe).__module__),
                   logging.getLogger("transformers.tokenization_utils_base")]  # its "longer than" note
        drop = _DropCut()
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)
        display.tally(f"clip-cut-{limit}", cut, lambda n: f"[yellow]warning:[/] {display.plural(n, 'caption')} "
                      f"{'was' if n == 1 else 'were'} cut to CLIP's {limit} tokens")


class _DropCut(logging.Filter):
    NOTES = ("truncated because CLIP can only handle", "Token indices sequence length is longer than")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(note in record.getMessage() for note in self.NOTES)

