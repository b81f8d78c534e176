"""The MiniGPT-5 model: a frozen LLM with n trainable vokens, a feature mapper, a frozen generator.

`build_model` is the one construction path, used by training, generation and tests. It takes what the
model needs (its backbones and sizes, the adapter, the losses' weights, a precision), never a whole
recipe: stages pass their own settings.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from minigpt5_cli.errors import UserError
from minigpt5_cli.modeling.backbones import LLM, load_llm
from minigpt5_cli.modeling.generators import Generator, caption_loss, load_generator
from minigpt5_cli.modeling.llm_families import layer_blocks, lora_targets, unwrap
from minigpt5_cli.modeling.losses import cached_latents, text_loss
from minigpt5_cli.modeling.mapper import FeatureMapper
from minigpt5_cli.modeling.runner import runner_for
from minigpt5_cli.modeling.vokens import VokenRows, add_vokens
from minigpt5_cli.recipe import AdapterConfig, LossConfig, ModelConfig

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # by recipe.PRECISIONS


def run_precision(precision: str, device: str, console) -> str:
    """`precision` as it runs on `device`: fp16 needs a GPU, and runs in fp32 elsewhere, said on `console`."""
    if precision == "fp16" and not device.startswith("cuda"):
        console.print("[yellow]warning:[/] fp16 needs a GPU; running in fp32 (bf16 works on CPUs)")
        return "no"
    return precision


class MiniGPT5(nn.Module):
    def __init__(self, llm: LLM, generator: Generator, mapper: FeatureMapper, vokens: VokenRows,
                 adapter: AdapterConfig, loss: LossConfig):
        super().__init__()
        self.llm = llm.model
        self.tokenizer, self.processor = llm.tokenizer, llm.processor
        self.llm_info, self.generator = llm, generator
        self.frozen = nn.ModuleDict(generator.parts())  # the generator's networks, frozen, moved with the model
        self.mapper, self.vokens = mapper, vokens
        self.first_voken = vokens.first
        self.loss_weights = loss
        self.runner = runner_for(llm.model, adapter.kind, adapter.virtual_tokens)
        # The layers FSDP wraps one by one (accelerate reads this): the LLM's decoder layers and the
        # denoiser's blocks, which run at every step. The rest (vision tower, text encoders, VAE, mapper)
        # runs only for some batches and stays whole on every process, outside any wrapped layer.
        self._no_split_modules = sorted(layer_blocks(llm.model) | generator.blocks())
        self.run_all_parts = False  # FSDP: a batch without target images runs the mapper and denoiser too

    @property
    def adapter_kind(self) -> str:
        """none, lora or prefix."""
        return self.runner.adapter

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # frozen backbones never leave eval mode
        return self

    def checkpoint_activations(self) -> None:
        """Recompute the LLM's layers and the denoiser's blocks in the backward pass instead of keeping
        their activations. Frozen parts run in eval mode, which transformers' layers skip, so only the
        LLM (in train mode) and the denoiser (diffusers checks only that gradients are on) take part."""
        unwrap(self.llm).activation_checkpointing_enable({"use_reentrant": False})
        self.generator.denoiser.enable_gradient_checkpointing()

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by component, in a fixed order."""
        adapter = [p for n, p in self.llm.named_parameters() if p.requires_grad]
        return {
            "vokens": [p for p in self.vokens.parameters() if p.requires_grad],
            "mapper": [p for p in self.mapper.parameters() if p.requires_grad],
            "adapter": adapter,
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for ps in self.trainable_groups().values() for p in ps]

    def voken_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of each voken group: the state that predicts [IMG0], then [IMG0]..[IMG{n-2}]."""
        rows, cols = (input_ids == self.first_voken).nonzero(as_tuple=True)
        cols = cols[:, None] - 1 + torch.arange(self.vokens.n, device=cols.device)
        return hidden[rows[:, None], cols]

    def target_latents(self, batch: dict) -> torch.Tensor:
        """Scaled latents of the target images: sampled from the cached VAE posterior when the data
        holds one, else encoded now. Both draw the same noise, so the loss is the same either way."""
        if "latent_mean" in batch:
            dtype = self.generator.vae.dtype
            with torch.no_grad():
                return self.generator.scale(cached_latents(batch["latent_mean"].to(dtype),
                                                           batch["latent_logvar"].to(dtype)))
        return self.generator.latents(batch["target_pixels"])

    def _idle_image_loss(self, states: torch.Tensor) -> torch.Tensor:
        """The image loss of one all-zero voken group on all-zero latents, times zero."""
        seq, pooled = self.mapper(states.new_zeros(1, self.vokens.n, states.shape[-1]).float())
        latents = torch.zeros(1, *self.generator.latent_shape, device=states.device, dtype=self.generator.vae.dtype)
        return self.generator.loss(seq, pooled, latents, self.loss_weights.snr_gamma) * 0.0

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        w = self.loss_weights
        out = self.runner(batch)
        logits, labels = out.logits.float(), batch["labels"]
        text = text_loss(logits, labels)
        zero = logits.new_zeros(())
        image = caption = zero
        states = self.voken_states(out.hidden_states[-1], batch["input_ids"])
        targets = batch["latent_mean" if "latent_mean" in batch else "target_pixels"].shape[0]
        if states.shape[0] != targets:
            raise RuntimeError("voken groups and target images do not match; the collator is out of step")
        if not states.shape[0] and self.run_all_parts:
            # Every process of a sharded model must run (and send gradients through) the same sharded
            # parts at every step: here with no image to learn, at zero weight.
            image = self._idle_image_loss(states)
        if states.shape[0]:
            drop = torch.rand(states.shape[0], device=states.device) < w.cfg_drop  # classifier-free guidance
            states = states.masked_fill(drop[:, None, None], 0.0)
            seq, pooled = self.mapper(states.float())
            image = self.generator.loss(seq, pooled, self.target_latents(batch), w.snr_gamma)
            if ("captions" in batch or "caption_embeds" in batch) and w.caption > 0:
                if "caption_embeds" in batch:
                    target = (batch["caption_embeds"], batch.get("caption_pooled"))
                else:
                    target = self.generator.encode(batch["captions"])
                null = self.generator.null()  # the target of a dropped condition: the encoders' ""
                target = tuple(None if t is None else torch.where(drop.view(-1, *[1] * (t.dim() - 1)), n.to(t), t)
                               for t, n in zip(target, null))
                caption = caption_loss((seq, pooled), target)
        loss = w.text * text + w.image * image + w.caption * caption
        return {"loss": loss, "text": text.detach(), "image": image.detach(), "caption": caption.detach()}


def _apply_adapter(a: AdapterConfig, model: nn.Module) -> nn.Module:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if a.kind == "none":
        return model
    if a.kind == "lora":
        # Only the language model's projections: a vision tower may use the same names.
        decoder = model.get_decoder()
        prefix = next(name for name, m in model.named_modules() if m is decoder)
        from transformers.pytorch_utils import Conv1D

        names = lora_targets(model, decoder, list(a.target_modules))
        targets = "|".join(map(re.escape, names))
        pattern = rf"{re.escape(prefix)}\..*\.({targets})" if prefix else rf".*\.({targets})"
        # GPT-2's projections are Conv1D, whose weight is stored transposed
        transposed = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in names for n, m in decoder.named_modules())
        config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=pattern,
                            fan_in_fan_out=transposed, task_type="CAUSAL_LM")
    else:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.virtual_tokens,
                                    prefix_projection=True, encoder_hidden_size=a.prefix_hidden)
    return get_peft_model(model, config)


def build_model(config: ModelConfig, adapter: AdapterConfig | None = None, *, loss: LossConfig | None = None,
                precision: str = "no", checkpointing: bool = False, freeze_mapper_input: bool = False,
                init_from: str | None = None, empty: bool = False) -> MiniGPT5:
    """Load both backbones in `precision` (no, bf16 or fp16), add vokens, freeze, attach the adapter and a
    fresh mapper, or the vokens and mapper of the checkpoint `init_from`. `config`: the backbones, the vokens
    and the mapper (a recipe's `model` section). `loss`: the weights training
    uses. `checkpointing`: recompute activations in the backward pass. `freeze_mapper_input`: the mapper's
    fc and queries stay as they are. `empty`: backbones built from their configs alone, no weights read
    (`train --plan`)."""
    from minigpt5_cli.modeling import checkpoint

    m, adapter = config, adapter or AdapterConfig()
    dtype = DTYPES[precision]
    llm = load_llm(m.llm, dtype=dtype, trust_remote_code=m.trust_remote_code, empty=empty)
    generator = load_generator(m.generator, dtype=dtype, empty=empty)
    first = add_vokens(llm, m.n_vokens)
    for module in (llm.model, *generator.parts().values()):
        module.requires_grad_(False)
        module.eval()
    vokens = VokenRows(llm.model, first, m.n_vokens)
    llm.model = _apply_adapter(adapter, llm.model)
    length, width = generator.cond_shape
    if (m.mapper.kind == "compact" or not m.mapper.hidden) and width % m.mapper.heads:
        raise UserError(f"the generator's conditioning width {width} is not a multiple of model.mapper.heads "
                        f"({m.mapper.heads}); set model.mapper.heads" +
                        (", or model.mapper.hidden" if m.mapper.kind == "paper" else ""))
    mapper = FeatureMapper(
        llm_width=llm.width, cond_len=length, cond_width=width, kind=m.mapper.kind, hidden=m.mapper.hidden,
        heads=m.mapper.heads, encoder_layers=m.mapper.encoder_layers, decoder_layers=m.mapper.decoder_layers,
        ffn=m.mapper.ffn, pooled_width=generator.pooled_width or 0,
    )
    net = MiniGPT5(llm, generator, mapper, vokens, adapter, loss or LossConfig())
    if init_from:
        checkpoint.load(net, init_from, adapter=False)
    if checkpointing:
        net.checkpoint_activations()
    if freeze_mapper_input:
        for name in FeatureMapper.input_modules:
            getattr(mapper, name).requires_grad_(False)
    return net
