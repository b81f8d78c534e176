"""Text-to-image generators by family, read from their diffusers pipeline: the conditioning each takes,
how its denoiser learns, and how its own pipeline renders a conditioning.

The mapper predicts whatever the generator's text encoders would give (`encode`, the pipeline's own
prompt path): a sequence (length x width) and, where the family has one, a pooled vector.

| family | sequence | pooled | extra inputs | loss |
| --- | --- | --- | --- | --- |
| SD 1.x / 2.x | CLIP last hidden states, 77 x 768 / 1024 | | | epsilon or v, Min-SNR |
| SDXL | two CLIP encoders' penultimate states, concatenated: 77 x 2048 | the second's, 1280 | size and crop time ids | epsilon or v, Min-SNR |
| SD3 | CLIP-L + CLIP-G (padded) and T5, one sequence: (77 + 256) x 4096 | CLIP-L + CLIP-G, 2048 | | flow matching, logit-normal times |
| FLUX.1 | T5, 512 x 4096 (256 for schnell) | CLIP-L, 768 | embedded guidance (dev) | flow matching on packed latents |

Each family is one class below `Generator`: it names the diffusers pipeline it handles (`PIPELINE`, which
registers it in FAMILIES), its denoiser and the blocks of it FSDP wraps, its conditioning, its loss and
how its pipeline renders.
"""

from __future__ import annotations

import abc
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minigpt5_cli import hub
from minigpt5_cli.errors import UserError

# The pipelines minigpt5 conditions, by class name: every family registers itself here.
FAMILIES: dict[str, type[Generator]] = {}


class Generator(abc.ABC):
    """A frozen text-to-image pipeline: what every family shares. A family class sets PIPELINE, family,
    MODELS and BLOCKS and gives its denoiser, conditioning, training schedule and loss."""

    PIPELINE: str  # the diffusers pipeline class it handles
    family: str  # its short name, in messages and the model's description
    MODELS: str  # the models it covers, as the refusal of any other pipeline lists them
    BLOCKS: tuple[str, ...]  # the denoiser's attributes that hold its blocks (a ModuleList, or one block)
    PACKING = 1  # denoiser input channels per latent channel

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "PIPELINE" in cls.__dict__:
            FAMILIES[cls.PIPELINE] = cls

    def __init__(self, pipe, name: str):
        self.pipe, self.name = pipe, name
        pipe.set_progress_bar_config(disable=True)  # progress is shown by the caller
        self.train_scheduler = self._train_scheduler()
        self._null = None

    @abc.abstractmethod
    def _train_scheduler(self):
        """The schedule training draws noise levels from, built from the pipeline's own."""

    # -- what it is

    @property
    def vae(self):
        return self.pipe.vae

    @property
    @abc.abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that learns: the UNet or the transformer."""

    def blocks(self) -> set[str]:
        """Class names of the denoiser's blocks, which run at every step: the layers FSDP wraps one by one."""
        parts = [getattr(self.denoiser, name) for name in self.BLOCKS]
        return {type(m).__name__ for part in parts if part is not None
                for m in (part if isinstance(part, nn.ModuleList) else [part])}

    def parts(self) -> dict[str, nn.Module]:
        """Its networks, all frozen in MiniGPT-5."""
        names = ("vae", "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    @abc.abstractmethod
    def cond_shape(self) -> tuple[int, int]:
        """(length, width) of the conditioning sequence."""

    @property
    def pooled_width(self) -> int | None:
        """Width of the pooled vector beside the sequence; None for families without one."""
        return None

    @property
    def resolution(self) -> int:
        return self.denoiser.config.sample_size * self.pipe.vae_scale_factor

    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling (times the denoiser's patch)."""
        return self.pipe.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the VAE latents of an image at the generator's resolution."""
        side = self.resolution // self.pipe.vae_scale_factor
        return self.vae.config.latent_channels, side, side

    @property
    def device(self):
        return self.denoiser.device

    def describe(self) -> dict:
        length, width = self.cond_shape
        return {"family": self.family, "sequence": [length, width], "pooled": self.pooled_width}

    # -- conditioning

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning of `texts` as the pipeline computes it for a prompt: (sequence, pooled)."""

    def null(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoders' conditioning of "": the target of a classifier-free-guidance drop."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null

    # -- latents

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser sees them."""
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.scale(self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample())

    # -- training

    @abc.abstractmethod
    def loss(self, seq: torch.Tensor, pooled: torch.Tensor | None, latents: torch.Tensor,
             snr_gamma: float) -> torch.Tensor:
        """The denoiser's training loss on scaled `latents` under the conditioning (seq, pooled)."""

    # -- rendering

    def render(self, seq, pooled, negative_seq, negative_pooled, guidance_scale: float, **kwargs) -> list:
        """Images from conditionings, through the pipeline's own call."""
        pooled_args = {} if pooled is None else {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds":
                                                 negative_pooled}
        return self.pipe(prompt_embeds=seq, negative_prompt_embeds=negative_seq, output_type="pil",
                         **self._render_extra(), **self._guidance(guidance_scale), **pooled_args, **kwargs).images

    def _render_extra(self) -> dict:
        return {}

    def _guidance(self, scale: float) -> dict:
        """Classifier-free guidance against the null condition, as the pipeline's call takes it."""
        return {"guidance_scale": scale}

    def render_text(self, texts: list[str], guidance_scale: float, **kwargs) -> list:
        """Images from prompt texts, through the pipeline's own prompt path (the two-stage baseline)."""
        return self.pipe(prompt=texts, output_type="pil", **self._render_extra(), **self._guidance(guidance_scale),
                         **kwargs).images

    def pipeline(self):
        return self.pipe


class SD(Generator):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder's last hidden states, a UNet that predicts the
    noise (epsilon) or the velocity (v), the pipeline's own DDPM-style schedule."""

    PIPELINE = "StableDiffusionPipeline"
    family = "SD 1.x / 2.x"
    MODELS = "Stable Diffusion 1.x / 2.x"
    BLOCKS = ("down_blocks", "mid_block", "up_blocks")

    def _train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)  # its betas and prediction type

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @property
    def cond_shape(self) -> tuple[int, int]:
        return self.tokenizer.model_max_length, self.denoiser.config.cross_attention_dim

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        seq, _ = self.pipe.encode_prompt(texts, self.device, 1, False)
        return seq.float(), None

    def loss(self, seq, pooled, latents, snr_gamma):
        from minigpt5_cli.modeling.losses import diffusion_loss

        return diffusion_loss(self.denoiser, self.train_scheduler, seq, latents, snr_gamma,
                              **self._extra(pooled, latents.shape[0]))

    def _extra(self, pooled, rows: int) -> dict:
        """Inputs the denoiser takes beside the sequence."""
        return {}


class SDXL(SD):
    """SDXL: two CLIP text encoders' penultimate hidden states, concatenated, the second's pooled
    output, and the size and crop "time ids", which training takes as a centred crop at the
    generator's resolution, as rendering at that size gives."""

    PIPELINE = "StableDiffusionXLPipeline"
    family = MODELS = "SDXL"

    @property
    def pooled_width(self) -> int:
        return self.pipe.text_encoder_2.config.projection_dim

    @torch.no_grad()
    def encode(self, texts):
        seq, _, pooled, _ = self.pipe.encode_prompt(texts, device=self.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        return seq.float(), pooled.float()

    def _extra(self, pooled, rows: int) -> dict:
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=pooled.device).expand(rows, -1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


class SD3(Generator):
    """SD3 / 3.5: CLIP-L and CLIP-G penultimate states (concatenated, padded to T5's width) followed by
    T5's sequence (zeros when the pipeline has no T5), their pooled outputs concatenated, an MM-DiT
    trained by flow matching: the velocity noise - latents at a sigma of the pipeline's schedule,
    drawn logit-normally."""

    PIPELINE = "StableDiffusion3Pipeline"
    family = "SD3"
    MODELS = "SD3 / 3.5"
    BLOCKS = ("transformer_blocks",)
    DEFAULT_T5_LENGTH = 256  # the pipeline's default max_sequence_length

    def _train_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)

    @property
    def denoiser(self):
        return self.pipe.transformer

    @property
    def t5_length(self) -> int:
        tok = getattr(self.pipe, "tokenizer_3", None)
        return min(self.DEFAULT_T5_LENGTH, tok.model_max_length) if tok is not None else self.DEFAULT_T5_LENGTH

    @property
    def cond_shape(self):
        return self.tokenizer.model_max_length + self.t5_length, self.denoiser.config.joint_attention_dim

    @property
    def pooled_width(self) -> int:
        return self.denoiser.config.pooled_projection_dim

    @property
    def size_step(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size

    def scale(self, latents):
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, texts):
        seq, _, pooled, _ = self.pipe.encode_prompt(texts, None, None, device=self.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False,
                                                    max_sequence_length=self.t5_length)
        return seq.float(), pooled.float()

    def loss(self, seq, pooled, latents, snr_gamma):
        from minigpt5_cli.modeling.losses import flow_matching_loss

        dtype = self.denoiser.dtype

        def velocity(noisy, t):
            return self.denoiser(hidden_states=noisy.to(dtype), timestep=t, encoder_hidden_states=seq.to(dtype),
                                 pooled_projections=pooled.to(dtype)).sample

        return flow_matching_loss(velocity, self.train_scheduler, latents)

    def _render_extra(self) -> dict:
        return {"max_sequence_length": self.t5_length}


class Flux(SD3):
    """FLUX.1: T5's sequence, CLIP-L's pooled output, and (FLUX.1-dev) an embedded guidance strength;
    a transformer over 2x2-packed latents, trained by flow matching as SD3 is. Classifier-free guidance
    against the null condition is the pipeline's "true CFG" (`true_cfg_scale` with negatives), so it
    works as for every other family; the embedded guidance stays at the pipeline's default, in training
    and in rendering alike."""

    PIPELINE = "FluxPipeline"
    family = MODELS = "FLUX.1"
    BLOCKS = ("transformer_blocks", "single_transformer_blocks")
    PACKING = 4  # 2x2 patches of latents, packed into channels
    EMBEDDED_GUIDANCE = 3.5  # the pipeline's default, and what diffusers' FLUX training scripts train with

    @property
    def t5_length(self) -> int:
        # dev was trained with 512 T5 tokens, schnell (no guidance embedding) with 256
        default = 512 if self.denoiser.config.guidance_embeds else 256
        return min(default, self.pipe.tokenizer_2.model_max_length)

    @property
    def cond_shape(self):
        return self.t5_length, self.denoiser.config.joint_attention_dim

    @property
    def resolution(self) -> int:
        return self.vae.config.sample_size  # the transformer has no sample size; its VAE's is 1024

    @property
    def size_step(self) -> int:
        return self.pipe.vae_scale_factor * 2  # 2x2 packing

    @torch.no_grad()
    def encode(self, texts):
        seq, pooled, _ = self.pipe.encode_prompt(texts, None, device=self.device, num_images_per_prompt=1,
                                                 max_sequence_length=self.t5_length)
        return seq.float(), pooled.float()

    def loss(self, seq, pooled, latents, snr_gamma):
        from minigpt5_cli.modeling.losses import flow_matching_loss

        pipe, dtype = self.pipe, self.denoiser.dtype
        rows, channels, height, width = latents.shape
        image_ids = pipe._prepare_latent_image_ids(rows, height // 2, width // 2, latents.device, dtype)
        text_ids = torch.zeros(seq.shape[1], 3, device=latents.device, dtype=dtype)
        guidance = (torch.full((rows,), self.EMBEDDED_GUIDANCE, device=latents.device)
                    if self.denoiser.config.guidance_embeds else None)
        factor = pipe.vae_scale_factor

        def velocity(noisy, t):
            packed = pipe._pack_latents(noisy.to(dtype), rows, channels, height, width)
            out = self.denoiser(hidden_states=packed, timestep=t.to(dtype) / 1000, guidance=guidance,
                                pooled_projections=pooled.to(dtype), encoder_hidden_states=seq.to(dtype),
                                txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            return pipe._unpack_latents(out, height * factor, width * factor, factor)

        return flow_matching_loss(velocity, self.train_scheduler, latents)

    def _guidance(self, scale: float) -> dict:
        return {"true_cfg_scale": scale, "guidance_scale": self.EMBEDDED_GUIDANCE}

    def render_text(self, texts, guidance_scale, **kwargs):
        # true CFG runs only with a negative prompt: "", the null condition of the other families
        return super().render_text(texts, guidance_scale, negative_prompt=[""] * len(texts), **kwargs)


def supported() -> str:
    """The models of every family, as a refusal lists them."""
    *first, last = [cls.MODELS for cls in FAMILIES.values()]
    return f"{', '.join(first)} or {last} (text-to-image)"


def load_generator(name: str, dtype: torch.dtype | None = None, empty: bool = False) -> Generator:
    """The generator's pipeline. `empty`: its networks built from their configs with fresh weights, none
    read (for `train --plan`, under accelerate's `init_empty_weights`); tokenizers and scheduler as usual."""
    from diffusers import DiffusionPipeline

    hub.quiet()
    path = hub.resolve(name, shapes_only=empty)
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation note on an argument diffusers passes
            warnings.simplefilter("ignore", UserWarning)
            index = DiffusionPipeline.load_config(path)
            # SD 1.x / 2.x pipelines name a safety checker: not loaded (it is not part of the conditioning)
            safety = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            built = _from_configs(path, index, dtype, skip=safety) if empty else {}
            pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **safety, **built)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise hub.load_error("generator", name, e, hub.files_hint(name) if empty else hub.OFFLINE_HINT) from None
    cls = FAMILIES.get(type(pipe).__name__)
    if cls is None:
        raise UserError(f"generator {name!r} is a {type(pipe).__name__}; minigpt5 needs {supported()}")
    gen = cls(pipe, name)
    channels, latent = gen.denoiser.config.in_channels, gen.vae.config.latent_channels
    if channels != latent * gen.PACKING:
        raise UserError(f"generator {name!r} has a denoiser of {channels} input channels for {latent}-channel "
                        f"latents (an inpainting or image-conditioned model); minigpt5 needs {supported()}")
    return gen


def _from_configs(path: str, index: dict, dtype, skip) -> dict[str, nn.Module]:
    """The pipeline's networks (diffusers models, transformers text encoders) from their configs."""
    import importlib

    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    built = {}
    for part, spec in index.items():
        if part in skip or not isinstance(spec, (list, tuple)) or len(spec) != 2 or None in spec:
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        if isinstance(cls, type) and issubclass(cls, ModelMixin):
            model = cls.from_config(cls.load_config(path, subfolder=part))
            built[part] = model.to(dtype) if dtype is not None else model
        elif isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            built[part] = cls._from_config(cls.config_class.from_pretrained(path, subfolder=part), dtype=dtype)
        # anything else (tokenizers, schedulers) is read as usual
    return built


def caption_loss(predicted: tuple, target: tuple) -> torch.Tensor:
    """MSE of the mapper's conditioning against the encoders' own: the sequence, plus the pooled vector
    where the family has one."""
    loss = F.mse_loss(predicted[0].float(), target[0].float())
    if predicted[1] is not None:
        loss = loss + F.mse_loss(predicted[1].float(), target[1].float())
    return loss
