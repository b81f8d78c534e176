"""The paper's backbones as shapes only: LLaVA-1.5-7B and Stable Diffusion 2.1 base, their configs
written out with no weights, for `train --plan` and the scale benchmark on a machine that cannot
fetch the real files.

`paper:llava-1.5-7b` and `paper:sd-2.1-base` resolve (through `hub.resolve`) to folders holding
each model's config (as published with `llava-hf/llava-1.5-7b-hf` and
`stabilityai/stable-diffusion-2-1-base`) and stand-in tokenizers of the same vocabulary sizes and
special tokens. Their parameter counts match the published models (tests/test_plan.py checks
7,063,427,072 and 865,910,724 + 83,653,863 + 340,387,840). The real files, fetched without weights,
give the same plan: `hf download llava-hf/llava-1.5-7b-hf --exclude '*.safetensors' ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

from minigpt5_cli.builders.common import clip_tokenizer

NAMES = ("paper:llava-1.5-7b", "paper:sd-2.1-base")
WEIGHTS = False  # configs only: `hub.resolve` gives them only where no weights are read
LLAVA_VOCAB = 32000  # Llama's, before LLaVA's <image> (32000) and <pad> (32001); the embeddings hold 32064


def build(name: str, out: Path) -> None:
    (_llava if name == "paper:llava-1.5-7b" else _sd21)(out)


def _llama_tokenizer():
    """Llama's special tokens and ids over a word-level vocabulary of Llama's size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"<w{i}>" for i in range(3, LLAVA_VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=4096)
    fast.add_tokens(["<image>"], special_tokens=True)
    fast.add_special_tokens({"pad_token": "<pad>"})
    return fast


def _llava(out: Path) -> None:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor)

    tok = _llama_tokenizer()
    config = LlavaConfig(
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=32001),
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                       hidden_act="quick_gelu", layer_norm_eps=1e-5),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576, tie_word_embeddings=False,
    )
    config.save_pretrained(out)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                      crop_size={"height": 336, "width": 336}),
                   tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(out)


def _sd21(out: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                cross_attention_dim=1024, use_linear_projection=True,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=2, sample_size=512)
    for folder, cls, config in (("unet", UNet2DConditionModel, unet), ("vae", AutoencoderKL, vae)):
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **config}, indent=2))
    CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                   layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                   pad_token_id=1).save_pretrained(out / "text_encoder")
    clip_tokenizer(77).save_pretrained(out / "tokenizer")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                  skip_prk_steps=True, steps_offset=1).save_config(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
