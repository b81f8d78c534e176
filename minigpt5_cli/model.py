"""The MiniGPT-5 model: a frozen LLM with n trainable vokens, a feature mapper, a frozen generator.

`build_model(recipe)` is the one construction path, used by training, generation and tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minigpt5_cli.backbones import LLM, Generator, load_generator, load_llm
from minigpt5_cli.errors import UserError
from minigpt5_cli.mapper import FeatureMapper
from minigpt5_cli.recipe import Recipe

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
META_FILE = "minigpt5.json"
PREFIX_FILE = "prefix_encoder.safetensors"


def voken_tokens(n: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(n)]


class VokenRows(nn.Module):
    """The only trainable rows of the LLM's input and output embeddings: those of the n vokens.

    Forward hooks splice these rows into the frozen embedding's output and the frozen LM head's
    logits, so no optimizer state exists for the full matrices. One mechanism serves stage 1, LoRA,
    prefix tuning and generation alike (PEFT's trainable tokens do not combine with prefix tuning).
    """

    def __init__(self, llm: nn.Module, first: int, n: int):
        super().__init__()
        self.first, self.n = first, n
        emb_in, emb_out = llm.get_input_embeddings(), llm.get_output_embeddings()
        self.rows_in = nn.Parameter(emb_in.weight[first:first + n].detach().float().clone())
        self.tied = emb_out is None or emb_out.weight is emb_in.weight
        self.rows_out = None if self.tied else nn.Parameter(emb_out.weight[first:first + n].detach().float().clone())
        self._head_bias = None if self.tied else getattr(emb_out, "bias", None)
        # Kept out of state_dict: hooks hold the modules, the module tree does not.
        self._handles = [emb_in.register_forward_hook(self._embed_hook)]
        if emb_out is not None:
            self._handles.append(emb_out.register_forward_hook(self._head_hook))

    def _embed_hook(self, module, args, output):
        ids = args[0]
        mask = (ids >= self.first) & (ids < self.first + self.n)
        new = self.rows_in.to(output.dtype)[(ids - self.first).clamp(0, self.n - 1)]
        return torch.where(mask.unsqueeze(-1), new, output)

    def _head_hook(self, module, args, output):
        rows = self.rows_in if self.tied else self.rows_out
        h = args[0]
        v = h @ rows.to(h.dtype).T
        if self._head_bias is not None:
            v = v + self._head_bias[self.first:self.first + self.n].to(v.dtype)
        return torch.cat([output[..., :self.first], v.to(output.dtype), output[..., self.first + self.n:]], dim=-1)


class MiniGPT5(nn.Module):
    def __init__(self, recipe: Recipe, llm: LLM, generator: Generator, mapper: FeatureMapper, vokens: VokenRows):
        super().__init__()
        from diffusers import DDPMScheduler

        self.recipe = recipe
        self.llm = llm.model
        self.tokenizer, self.processor = llm.tokenizer, llm.processor
        self.llm_info, self.gen_info = llm, generator
        self.vae, self.unet, self.text_encoder = generator.vae, generator.unet, generator.text_encoder
        self.mapper, self.vokens = mapper, vokens
        # Training noise follows the generator's own schedule (betas, prediction type).
        self.noise_scheduler = DDPMScheduler.from_config(generator.scheduler.config)
        self.first_voken = vokens.first
        self._null_caption = None

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.vae, self.unet, self.text_encoder):  # frozen backbones never leave eval mode
            frozen.eval()
        return self

    # -- parameters ---------------------------------------------------------------------------
    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by component, in a fixed order."""
        adapter = [p for n, p in self.llm.named_parameters() if p.requires_grad]
        return {
            "vokens": [p for p in self.vokens.parameters() if p.requires_grad],
            "mapper": [p for p in self.mapper.parameters() if p.requires_grad],
            "adapter": adapter,
        }

    # -- losses -------------------------------------------------------------------------------
    def voken_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of each voken group: the state that predicts [IMG0], then [IMG0]..[IMG{n-2}]."""
        rows, cols = (input_ids == self.first_voken).nonzero(as_tuple=True)
        cols = cols[:, None] - 1 + torch.arange(self.vokens.n, device=cols.device)
        return hidden[rows[:, None], cols]

    def null_caption(self) -> torch.Tensor:
        if self._null_caption is None:
            ids = self.gen_info.tokenizer([""], padding="max_length", truncation=True, return_tensors="pt",
                                          max_length=self.gen_info.cond_shape[0]).input_ids
            with torch.no_grad():
                self._null_caption = self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state.float()
        return self._null_caption

    def target_latents(self, batch: dict) -> torch.Tensor:
        """Scaled latents of the target images: sampled from the cached VAE posterior when the data
        holds one, else encoded now. Both draw the same noise, so the loss is the same either way."""
        with torch.no_grad():
            if "latent_mean" in batch:
                mean = batch["latent_mean"].to(self.vae.dtype)
                std = torch.exp(0.5 * batch["latent_logvar"].clamp(-30.0, 20.0)).to(self.vae.dtype)
                latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
            else:
                latents = self.vae.encode(batch["target_pixels"].to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def diffusion_loss(self, cond: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(self.unet, self.noise_scheduler, cond, latents, self.recipe.loss.snr_gamma)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        w = self.recipe.loss
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
        out = self.llm(**inputs, output_hidden_states=True)
        logits, labels = out.logits.float(), batch["labels"]
        text = text_loss(logits, labels)
        zero = logits.new_zeros(())
        image = caption = zero
        states = self.voken_states(out.hidden_states[-1], batch["input_ids"])
        targets = batch["latent_mean" if "latent_mean" in batch else "target_pixels"].shape[0]
        if states.shape[0] != targets:
            raise RuntimeError("voken groups and target images do not match; the collator is out of step")
        if states.shape[0]:
            drop = torch.rand(states.shape[0], device=states.device) < w.cfg_drop  # classifier-free guidance
            states = states.masked_fill(drop[:, None, None], 0.0)
            cond = self.mapper(states.float())
            image = self.diffusion_loss(cond, self.target_latents(batch))
            if ("caption_ids" in batch or "caption_embeds" in batch) and w.caption > 0:
                if "caption_embeds" in batch:
                    target = batch["caption_embeds"].float()
                else:
                    with torch.no_grad():
                        target = self.text_encoder(batch["caption_ids"]).last_hidden_state.float()
                target = torch.where(drop[:, None, None], self.null_caption(), target)
                caption = F.mse_loss(cond.float(), target)
        loss = w.text * text + w.image * image + w.caption * caption
        return {"loss": loss, "text": text.detach(), "image": image.detach(), "caption": caption.detach()}

    # -- checkpoints --------------------------------------------------------------------------
    def meta(self) -> dict:
        length, width = self.gen_info.cond_shape
        text = self.llm_info.model.config.get_text_config()
        return {
            "llm": self.llm_info.name, "generator": self.gen_info.name, "llm_width": self.llm_info.width,
            "llm_type": self.llm_info.model.config.model_type, "llm_layers": text.num_hidden_layers,
            "first_voken_id": self.first_voken, "n_vokens": self.vokens.n, "cond_shape": [length, width],
            "adapter": self.recipe.adapter.kind,
        }

    def save_trainables(self, folder: str | Path) -> None:
        """Write only the trained weights, in Hugging Face formats."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.vokens.state_dict().items()},
                  folder / "vokens.safetensors")
        self.mapper.save_pretrained(folder / "mapper")
        if self.recipe.adapter.kind != "none":
            self.llm.save_pretrained(folder / "adapter")
        if self.recipe.adapter.kind == "prefix":
            # PEFT saves the prefix as its computed key/values, which is enough for inference but not
            # for training on: keep the projection's own weights beside it.
            save_file({k: v.detach().contiguous() for k, v in self.llm.prompt_encoder.state_dict().items()},
                      folder / PREFIX_FILE)
        (folder / META_FILE).write_text(json.dumps(self.meta(), indent=2))

    def load_trainables(self, folder: str | Path, adapter: bool = True) -> None:
        """Load weights written by `save_trainables`; refuse a checkpoint made for other backbones."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{folder} is not a minigpt5 checkpoint (no {META_FILE})")
        check_compatible(json.loads(meta_path.read_text()), self.meta(), folder, adapter)
        self.vokens.load_state_dict(load_file(folder / "vokens.safetensors"))
        saved = {k: v for k, v in FeatureMapper.load_config(folder / "mapper").items() if not k.startswith("_")}
        wanted = {k: v for k, v in self.mapper.config.items() if not k.startswith("_")}
        if saved != wanted:
            diff = ", ".join(f"{k} {saved.get(k)} there, {v} here" for k, v in wanted.items() if saved.get(k) != v)
            raise UserError(f"checkpoint {folder}: its mapper differs from the recipe's ({diff})")
        self.mapper.load_state_dict(load_file(folder / "mapper" / "diffusion_pytorch_model.safetensors"))
        if adapter and self.recipe.adapter.kind == "prefix":
            self.llm.prompt_encoder.load_state_dict(load_file(folder / PREFIX_FILE))
        elif adapter and self.recipe.adapter.kind == "lora":
            state = load_file(folder / "adapter" / "adapter_model.safetensors")
            result = set_peft_model_state_dict(self.llm, state)
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"checkpoint {folder}: its adapter does not fit this model")


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions (-100 elsewhere)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def diffusion_loss(unet, sched, cond: torch.Tensor, latents: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """The generator's noise-prediction loss on `latents` under conditioning `cond`, with its own
    schedule and prediction type, Min-SNR weighted when `snr_gamma` > 0."""
    from diffusers.training_utils import compute_snr

    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # layout-independent draw
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = sched.add_noise(latents, noise, t)
    kind = sched.config.prediction_type
    target = noise if kind == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
    mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma > 0:  # Min-SNR: weight = min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v
        snr = compute_snr(sched, t).float()
        mse = mse * snr.clamp(max=snr_gamma) / (snr if kind == "epsilon" else snr + 1)
    return mse.mean()


def check_compatible(saved: dict, current: dict, folder: Path, adapter: bool) -> None:
    keys = ["llm_type", "llm_layers", "llm_width", "first_voken_id", "n_vokens", "cond_shape"] + (["adapter"] if adapter else [])
    for key in keys:
        if saved.get(key) != current[key]:
            raise UserError(
                f"checkpoint {folder} was made for other backbones: {key} is {saved.get(key)} there, "
                f"{current[key]} here (checkpoint: {saved.get('llm')} + {saved.get('generator')})"
            )


def _add_vokens(llm: LLM, n: int) -> int:
    """Add the voken tokens; initialise their embedding rows to the mean of the existing rows."""
    tok = llm.tokenizer
    tokens = voken_tokens(n)
    tok.add_tokens(tokens, special_tokens=True)
    ids = tok.convert_tokens_to_ids(tokens)
    first = ids[0]
    if ids != list(range(first, first + n)):
        raise UserError(f"the tokenizer of {llm.name!r} gave non-contiguous voken ids {ids}")
    model = llm.model
    if model.get_input_embeddings().num_embeddings < first + n:  # some vocabularies are padded already
        model.resize_token_embeddings(first + n, mean_resizing=False)
    with torch.no_grad():
        for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
            emb.weight[first:first + n] = emb.weight[:first].float().mean(0).to(emb.weight.dtype)
    return first


def _apply_adapter(recipe: Recipe, model: nn.Module) -> nn.Module:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    a = recipe.adapter
    if a.kind == "none":
        return model
    if a.kind == "lora":
        # Only the language model's projections: a vision tower may use the same names.
        decoder = model.get_decoder()
        prefix = next(name for name, m in model.named_modules() if m is decoder)
        targets = "|".join(map(re.escape, a.target_modules))
        pattern = rf"{re.escape(prefix)}\..*\.({targets})" if prefix else rf".*\.({targets})"
        config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=pattern,
                            task_type="CAUSAL_LM")
    else:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.virtual_tokens,
                                    prefix_projection=True, encoder_hidden_size=a.prefix_hidden)
    return get_peft_model(model, config)


def build_model(recipe: Recipe, init_from: str | None = None) -> MiniGPT5:
    """Load both backbones, add vokens, freeze, attach the adapter and a fresh or loaded mapper."""
    dtype = DTYPES[recipe.train.mixed_precision]
    m = recipe.model
    llm = load_llm(m.llm, dtype=dtype, trust_remote_code=m.trust_remote_code)
    generator = load_generator(m.generator, dtype=dtype)
    first = _add_vokens(llm, m.n_vokens)
    for module in (llm.model, generator.vae, generator.unet, generator.text_encoder):
        module.requires_grad_(False)
        module.eval()
    vokens = VokenRows(llm.model, first, m.n_vokens)
    llm.model = _apply_adapter(recipe, llm.model)
    length, width = generator.cond_shape
    mapper = FeatureMapper(
        llm_width=llm.width, cond_len=length, cond_width=width, kind=m.mapper.kind, hidden=m.mapper.hidden,
        heads=m.mapper.heads, encoder_layers=m.mapper.encoder_layers, decoder_layers=m.mapper.decoder_layers,
        ffn=m.mapper.ffn,
    )
    model = MiniGPT5(recipe, llm, generator, mapper, vokens)
    if init_from:
        model.load_trainables(init_from, adapter=False)
    if recipe.train.freeze_mapper_input:
        for name in FeatureMapper.input_modules:
            getattr(mapper, name).requires_grad_(False)
    return model
