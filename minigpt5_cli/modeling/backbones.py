"""Loading the two frozen backbones from a hub id or a local folder.

The LLM is any `AutoModelForCausalLM` (text only) or `AutoModelForImageTextToText` (LLaVA-style:
prompts can hold images). The generator is a diffusers Stable Diffusion-style pipeline. The
conditioning shape (length, width) is read from the loaded generator, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minigpt5_cli import hub
from minigpt5_cli.errors import UserError
from minigpt5_cli.toyworld import tiny

OFFLINE_HINT = "offline, pass a local folder made with save_pretrained"


@dataclass
class LLM:
    model: Any  # the transformers model
    tokenizer: Any
    processor: Any | None  # set for image-text-to-text models: it expands image placeholders
    name: str

    @property
    def accepts_images(self) -> bool:
        return self.processor is not None

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim


@dataclass
class Generator:
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the pipeline's own (inference) scheduler
    name: str

    @property
    def cond_shape(self) -> tuple[int, int]:
        """(length, width) of the text conditioning the UNet cross-attends to."""
        return self.tokenizer.model_max_length, self.unet.config.cross_attention_dim

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self):
        """A diffusers Stable Diffusion pipeline over these components, for rendering."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)  # progress is shown by the caller
        return pipe


def load_llm(name: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> LLM:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    hub.quiet()
    path = tiny.resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        multimodal = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code) if multimodal else None
        tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise hub.load_error("LLM", name, e, OFFLINE_HINT) from None
    if tokenizer.pad_token is None:  # the paper pads with eos
        tokenizer.pad_token = tokenizer.eos_token
    return LLM(model=model, tokenizer=tokenizer, processor=processor, name=name)


def load_generator(name: str, dtype: torch.dtype | None = None) -> Generator:
    from diffusers import DiffusionPipeline

    hub.quiet()
    path = tiny.resolve(name)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            path, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise hub.load_error("generator", name, e, OFFLINE_HINT) from None
    missing = [c for c in ("vae", "unet", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, c, None) is None]
    if missing or getattr(pipe, "text_encoder_2", None) is not None:
        raise UserError(
            f"generator {name!r} is a {type(pipe).__name__}; minigpt5 needs a Stable Diffusion-style "
            "pipeline with one text encoder (SD 1.x / 2.x)"
        )
    return Generator(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                     scheduler=pipe.scheduler, name=name)
