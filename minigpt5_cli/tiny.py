"""Tiny random-weight backbones, built from configs and saved with `save_pretrained`.

They exist so that tests and the debug recipes run offline in seconds. A recipe names them as
`tiny:llama` (text-only causal LM), `tiny:llava` (image-text-to-text) or `tiny:sd` (Stable
Diffusion). `resolve` builds the folder once into a cache and returns its path; the production
loaders in `backbones.py` then load it like any local folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_NAMES = ("tiny:llama", "tiny:llava", "tiny:sd")
VERSION = "1"  # bump when a builder changes, so stale caches are not reused

# A few lines of plain English so the byte-level BPE learns some merges; any text still encodes.
_CORPUS = [
    "a red circle at the top left", "a blue square in the middle", "a green triangle at the bottom",
    "the local parish holds a craft show each year", "it moves to the right", "it turns into a square",
    "there is a shape in the middle", "generate an image with the scene description",
    "tell me the next scene with image", "Human: Assistant: ###",
]


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT5_CACHE", Path.home() / ".cache" / "minigpt5")) / "tiny"


def resolve(name: str) -> str:
    """Return a local folder for `name`, building it first if needed. Other names pass through."""
    if not name.startswith("tiny:"):
        return name
    if name not in TINY_NAMES:
        from minigpt5_cli.errors import UserError

        raise UserError(f"unknown tiny backbone {name!r}; choose one of {', '.join(TINY_NAMES)}")
    target = cache_dir() / f"{name.split(':')[1]}-v{VERSION}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: several processes may race here.
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        build(name, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.exists():
                raise
    return str(target)


def build(name: str, out: str | Path) -> str:
    """Build tiny backbone `name` with fixed random weights into folder `out`."""
    torch.manual_seed(0)
    out = Path(out)
    if name == "tiny:sd":
        _build_sd(out)
    else:
        _build_llm(out, vision=name == "tiny:llava")
    return str(out)


def _llm_tokenizer(extra_special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", *extra_special]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        model_max_length=512,
    )


def _text_config(vocab_size: int, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _build_llm(out: Path, vision: bool) -> None:
    from transformers import LlamaForCausalLM

    if not vision:
        tok = _llm_tokenizer([])
        model = LlamaForCausalLM(_text_config(len(tok), tok))
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return

    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _llm_tokenizer(["<image>"])
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=patch, projection_dim=32,
        ),
        text_config=_text_config(len(tok), tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)


def _clip_tokenizer(max_length: int):
    """A character-level CLIP tokenizer: the byte alphabet, with and without `</w>`, no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _build_sd(out: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cond_len, width = 16, 32  # deliberately not 77 x 1024: nothing may assume SD's numbers
    tokenizer = _clip_tokenizer(cond_len)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=cond_len,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=width,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
