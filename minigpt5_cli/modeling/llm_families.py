"""What differs between LLM families, in one table: how LoRA finds the attention projections, what
target tokens carry in `token_type_ids`, where positions start, and how a prompt without images is
written for a processor that will not take one.

Everything else is read from the model and its processor: the tensors the processor returns, the
chat template, the embedding's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from minigpt5_cli.errors import UserError

# Attention projections that LoRA adapts when the recipe leaves `adapter.target_modules` empty and
# PEFT knows no default for the model type: separate q and v projections, or a fused one.
ATTENTION_PROJECTIONS = (["q_proj", "v_proj"], ["qkv_proj"], ["query_key_value"], ["c_attn"], ["Wqkv"])


@dataclass(frozen=True)
class Quirks:
    # token_type_ids of target and generated tokens: PaliGemma's prefix attends both ways, its
    # suffix (what the model writes) causally, told apart by type 1
    target_token_type: int = 0
    position_offset: int = 0  # PaliGemma counts positions from 1
    # a processor that refuses a prompt without images: how such a prompt is written instead, as the
    # processor writes it around images (PaliGemma: <bos> before the text, a newline after it)
    text_only: Callable[[str, object], str] | None = None
    # with a prefix in the cache, the model reads token_type_ids only when the batch has pixels (it takes
    # a filled cache for generation): the prompt's attention would change with the batch. Prefix tuning
    # then leaves token types out, and the prompt attends causally, in training and generation alike.
    prefix_drops_token_types: bool = False
    # a processor that puts one image's tokens before the text, whatever the images (BLIP-2's): the image
    # tokens are written where each image is instead, the pixels come from its image processor alone
    images_in_place: bool = False


QUIRKS = {
    "blip-2": Quirks(images_in_place=True),
    "paligemma": Quirks(target_token_type=1, position_offset=1, prefix_drops_token_types=True,
                        text_only=lambda text, tokenizer: f"{tokenizer.bos_token}{text}\n"),
}


def unwrap(model):
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def quirks(model) -> Quirks:
    return QUIRKS.get(unwrap(model).config.model_type, Quirks())


def layer_blocks(model) -> set[str]:
    """Class names of the LLM's decoder layers, whatever its stack is called (layers, h, blocks): what
    FSDP wraps one by one."""
    model = unwrap(model)
    depth = model.config.get_text_config().num_hidden_layers
    layers = next((m for m in model.get_decoder().modules() if isinstance(m, nn.ModuleList) and len(m) == depth), [])
    return {type(m).__name__ for m in layers}


def linear_names(module: nn.Module) -> list[str]:
    """The distinct names of `module`'s linear layers (nn.Linear, and transformers' Conv1D of GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and name})


def lora_targets(model: nn.Module, language_model: nn.Module, asked: list[str]) -> list[str]:
    """The module names LoRA adapts inside the language model: those asked for, or PEFT's default for
    the model type, or the first attention projections of ATTENTION_PROJECTIONS the model has."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    names = set(linear_names(language_model))
    if asked:
        if not names & set(asked):
            raise UserError(f"adapter.target_modules {asked} match no layer of the language model; its linear "
                            f"layers are {', '.join(sorted(names))}")
        return list(asked)
    config = model.config.get_text_config()
    for option in [DEFAULTS.get(config.model_type) or DEFAULTS.get(model.config.model_type), *ATTENTION_PROJECTIONS]:
        if option and set(option) <= names:
            return list(option)
    raise UserError(f"no default LoRA targets for {model.config.model_type!r}: set adapter.target_modules to some "
                    f"of its language model's linear layers ({', '.join(sorted(names))})")
