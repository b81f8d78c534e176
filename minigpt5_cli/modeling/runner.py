"""Running the language model, over whole sequences (training, the memory plan) and over cached steps
(decoding). What families differ in when they are called lives here and nowhere else: a prefix held
in the cache, the token types of new tokens, M-RoPE's 3-D positions, the cache argument's name.

A family with its own calling convention subclasses `LLMRunner` and registers it in RUNNERS under its
`model_type`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from minigpt5_cli.modeling.llm_families import quirks, unwrap

# Batch keys that are training targets, not model inputs.
TARGETS = ("labels", "target_pixels", "latent_mean", "latent_logvar", "captions", "caption_embeds", "caption_pooled")
# What M-RoPE's position function reads of a batch beside the ids.
ROPE_INPUTS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def continued(last: dict[str, torch.Tensor], width: int, target_type: int) -> dict[str, torch.Tensor]:
    """The per-token inputs of `width` new tokens from those of the last token before them: the attention
    mask 1, token types as the family writes what the model says, anything else (Mllama's
    cross-attention mask) as the last token's."""
    out = {}
    for key, value in last.items():
        if key == "attention_mask":
            out[key] = torch.ones(value.shape[0], width, dtype=value.dtype, device=value.device)
        elif key == "token_type_ids":
            out[key] = torch.full((value.shape[0], width), target_type, dtype=value.dtype, device=value.device)
        else:
            out[key] = value[:, -1:].expand(value.shape[0], width, *value.shape[2:])
    return out


def prefix_cache(peft_model, rows: int, length: int):
    """PEFT's prefix as a cache for `rows` sequences of up to `length` tokens. Cross-attention layers
    (Mllama's, which attend to the image tiles) keep no prefix: their cache is the images' keys."""
    from transformers.cache_utils import DynamicLayer

    cache = peft_model.get_prompt(rows, max_cache_len=length)
    for index in getattr(unwrap(peft_model).config.get_text_config(), "cross_attention_layers", None) or []:
        cache.layers[index] = DynamicLayer()
    return cache


def cache_arg(model) -> str:
    """The name `model` takes its cache by: transformers renamed `past_key_values` to `cache` during 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class Decoding:
    """A batch being decoded: its cache, the attention mask of everything fed so far (any prefix
    included), the per-token inputs new tokens carry on, and what M-RoPE positions are computed from."""

    cache: object
    mask: torch.Tensor
    carried: dict[str, torch.Tensor]
    seq: dict[str, torch.Tensor]


class LLMRunner:
    """Calls one language model (a transformers model, or PEFT's wrapper of one) for training and decoding."""

    def __init__(self, model, adapter: str = "none", virtual_tokens: int = 0):
        self.model, self.adapter = model, adapter
        self.prefix = adapter == "prefix"
        self.virtual = virtual_tokens if self.prefix else 0
        base = unwrap(model)
        self.quirks = quirks(base)
        # Models with multimodal RoPE (Qwen2-VL's 3-D positions) compute positions from the attention mask
        # and the image grids themselves; a 1-D position_ids would override them.
        self.own_positions = hasattr(getattr(base, "model", None), "get_rope_index")
        self.cache_arg = cache_arg(base)
        # PEFT's prefix forward rebuilds the cache (and drops token_type_ids: Gemma 3's image blocks,
        # PaliGemma's prefix-LM mask), so behind a cache of our own the base model is called.
        self.call = model.get_base_model() if self.prefix else model

    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every tensor the processor gave (the batch's targets aside), pixels in the model's precision;
        token types left out where the family reads them differently behind a prefix (Quirks)."""
        dtype = self.model.dtype
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items() if k not in TARGETS}
        if self.prefix and self.quirks.prefix_drops_token_types:
            inputs.pop("token_type_ids", None)
        return inputs

    def _feed(self, inputs: dict) -> dict[str, torch.Tensor]:
        """What the model is called with for `inputs` (the token ids and the processor's other tensors)."""
        return inputs

    def _rope(self, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        """The 3-D positions the model gives the tokens of `inputs` under `mask`, after any prefix."""
        rope = unwrap(self.model).model.get_rope_index
        known = inspect.signature(rope).parameters
        kwargs = {k: v for k, v in inputs.items() if k in known and k not in ("input_ids", "attention_mask")}
        return rope(inputs["input_ids"], attention_mask=mask, **kwargs)[0] + self.virtual

    def __call__(self, batch: dict):
        """The model over whole right-padded sequences, with hidden states. With prefix tuning, the
        base model behind a cache holding the prefix, as decoding calls it; positions after the prefix."""
        inputs = self._inputs(batch)
        if not self.prefix:
            return self.call(**self._feed(inputs), output_hidden_states=True)
        rows, length = inputs["input_ids"].shape
        mask = inputs.pop("attention_mask")
        if self.own_positions:
            inputs["position_ids"] = self._rope(inputs, mask)
        cache = prefix_cache(self.model, rows, length + self.virtual)
        return self.call(**self._feed(inputs), attention_mask=torch.cat([mask.new_ones(rows, self.virtual), mask], 1),
                         output_hidden_states=True, **{self.cache_arg: cache})

    def start(self, batch: dict, room: int) -> tuple[torch.Tensor, torch.Tensor, Decoding]:
        """Feed left-padded prompts, leaving room in the cache for `room` more tokens. Returns the last
        position's logits, the hidden states and the decoding state."""
        inputs = self._inputs(batch)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        rows, width = ids.shape
        carried = {k: v[:, -1:] for k, v in inputs.items() if v.dim() >= 2 and v.shape[1] == width}
        cache = None
        if self.prefix:
            cache = prefix_cache(self.model, rows, self.virtual + width + room)
        seq = {k: v for k, v in inputs.items() if k in ROPE_INPUTS}
        seq["input_ids"] = ids[:, :0]
        state = Decoding(cache, mask.new_ones(rows, self.virtual), carried, seq)
        return (*self.step(state, ids, mask, inputs), state)

    def step(self, state: Decoding, ids: torch.Tensor, mask: torch.Tensor,
             inputs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `ids` (rows x width, masked holes on the left of shorter rows) on the cache: the last
        position's logits (float) and the hidden states. Positions are the training ones, whatever holes
        the batch has: 1-D from the mask, or M-RoPE's of the whole sequence so far, after any prefix.
        `inputs`: the prompt's other inputs; new tokens carry on the prompt's last ones."""
        state.mask = torch.cat([state.mask, mask], 1)
        width = ids.shape[1]
        if inputs is None:
            inputs = continued(state.carried, width, self.quirks.target_token_type)
        if self.own_positions:
            seq = state.seq
            seq["input_ids"] = torch.cat([seq["input_ids"], ids], 1)
            types = seq.get("mm_token_type_ids")
            if types is not None and types.shape[1] < seq["input_ids"].shape[1]:  # new tokens are text
                seq["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], width)], 1)
            positions = self._rope(seq, state.mask[:, self.virtual:])[..., -width:]
        else:
            positions = (state.mask.cumsum(-1) - 1).clamp(min=0)[:, -width:] + self.quirks.position_offset
        out = self.call(**self._feed({"input_ids": ids, **inputs}), attention_mask=state.mask, use_cache=True,
                        output_hidden_states=True, logits_to_keep=1, position_ids=positions,
                        **{self.cache_arg: state.cache})
        state.cache = out[self.cache_arg]
        return out.logits[:, -1].float(), out.hidden_states[-1]


class Blip2Runner(LLMRunner):
    """BLIP-2 with a decoder-only language model (MiniGPT-4's layout): each image is encoded once into the
    Q-Former's query embeddings (vision tower, Q-Former, projection), spliced in order where the prompt
    holds the image token; the language model then runs on the embeddings, for training, the prompt and
    every cached step alike. A prompt without images needs no pixels. Where no pixels come with the ids
    (a cached step), an image token is an ordinary token, embedded by its own row: the released MiniGPT-5
    can sample its image placeholder and embeds it so."""

    def __init__(self, model, adapter: str = "none", virtual_tokens: int = 0):
        super().__init__(model, adapter, virtual_tokens)
        self.blip = unwrap(model)
        self.call = self.blip.language_model  # LoRA's layers live inside it
        self.cache_arg = cache_arg(self.call)

    def _feed(self, inputs: dict) -> dict[str, torch.Tensor]:
        inputs = dict(inputs)
        ids, pixels = inputs.pop("input_ids"), inputs.pop("pixel_values", None)
        embeds = self.blip.get_input_embeddings()(ids)  # the voken rows come in through its hook
        if pixels is None:
            return {"inputs_embeds": embeds, **inputs}
        slots = (ids == self.blip.config.image_token_id).unsqueeze(-1)
        features = self.blip.get_image_features(pixels, return_dict=True).pooler_output
        if slots.sum() != features.shape[0] * features.shape[1]:
            raise RuntimeError(f"{int(slots.sum())} image tokens for {features.shape[0]} images of "
                               f"{features.shape[1]} query embeddings; the collator is out of step")
        return {"inputs_embeds": embeds.masked_scatter(slots, features.to(embeds.dtype)), **inputs}


# Runners of families with a calling convention of their own, by model_type.
RUNNERS: dict[str, type[LLMRunner]] = {"blip-2": Blip2Runner}


def runner_for(model, adapter: str = "none", virtual_tokens: int = 0) -> LLMRunner:
    return RUNNERS.get(unwrap(model).config.model_type, LLMRunner)(model, adapter, virtual_tokens)
