"""Tiny random-weight models of each LLM and VLM family, built from their config classes with their own
processors, and saved with save_pretrained: `model.llm` names the folder like any local checkpoint.

Every model is 2 layers of width 32 (vision towers too, at 32 px or the family's smallest valid
size). Tokenizers are byte-level BPE with each family's special tokens; where a family's processor
or chat format needs a chat template, a small one of its own shape is given (these tests check the
plumbing, not the real templates).
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = ["a red circle at the top left", "there is a shape in the middle", "it moves to the right",
          "Human: Assistant: ### user assistant system model", "tell me the next scene with image"]
W, LAYERS, HEADS = 32, 2, 4

# Chat templates of the usual shapes (the tests' own, small): ChatML, Gemma's turns, Llama 3's headers.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
          "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ IMAGE }}{% else %}{{ c['text'] }}"
          "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
          "assistant\n{% endif %}")
TURNS = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
         "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == "
         "'image' %}{{ IMAGE }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
HEADERS = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
           "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == "
           "'image' %}{{ IMAGE }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
           "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# LLaVA's shape: a turn's images first, then its texts (llava-1.5 and llava-v1.6 on the hub write it so)
IMAGES_FIRST = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] | selectattr('type', "
                "'equalto', 'image') %}<image>\n{% endfor %}{% for c in m['content'] | selectattr('type', 'equalto', "
                "'text') %}{{ c['text'] }} {% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def template(shape: str, image: str = "") -> str:
    return shape.replace("{{ IMAGE }}", image)


def tokenizer(specials=(), bos="<s>", eos="</s>", pad=None, extra=None, chat_template=None, **kw):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = list(dict.fromkeys(["<unk>", bos, eos, *([pad] if pad else []), *specials]))
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=names, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token=eos,
                                  pad_token=pad, extra_special_tokens=extra or {}, model_max_length=512, **kw)
    if chat_template:
        out.chat_template = chat_template
    return out


def text_config(cls, tok, vocab=None, **kw):
    base = dict(vocab_size=vocab or len(tok), hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)
    base.update(kw)
    return cls(**base)


def clip_vision(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            image_size=32, patch_size=8, projection_dim=W, **kw)


def siglip_vision(size=32, patch=8):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, image_size=size, patch_size=patch)


# ---------------------------------------------------------------- text-only families


def llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    LlamaForCausalLM(text_config(LlamaConfig, tok)).save_pretrained(out)
    tok.save_pretrained(out)


def qwen2(out: Path) -> None:
    """A vocabulary padded past the tokenizer's (as Qwen2's is), tied embeddings, a ChatML template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer(["<|im_start|>"], bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
                    chat_template=template(CHATML))
    Qwen2ForCausalLM(text_config(Qwen2Config, tok, vocab=len(tok) + 37, tie_word_embeddings=True)).save_pretrained(out)
    tok.save_pretrained(out)


def qwen3(out: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tokenizer(["<|im_start|>"], bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
                    chat_template=template(CHATML))
    Qwen3ForCausalLM(text_config(Qwen3Config, tok, head_dim=8)).save_pretrained(out)
    tok.save_pretrained(out)


def mistral(out: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    tok = tokenizer()
    MistralForCausalLM(text_config(MistralConfig, tok, head_dim=8)).save_pretrained(out)
    tok.save_pretrained(out)


def phi3(out: Path) -> None:
    """Fused attention (qkv_proj): no q_proj or v_proj for LoRA to find."""
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = tokenizer(eos="<|endoftext|>")
    Phi3ForCausalLM(text_config(Phi3Config, tok)).save_pretrained(out)
    tok.save_pretrained(out)


def gpt_neox(out: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = tokenizer(bos="<|endoftext|>", eos="<|endoftext|>")
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def gpt2(out: Path) -> None:
    """Conv1D projections (c_attn), learned absolute positions, no pad token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer(bos="<|endoftext|>", eos="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tok), n_embd=W, n_layer=LAYERS, n_head=HEADS, n_positions=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)


def opt(out: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    tok = tokenizer(bos="</s>", eos="</s>", pad="<pad>")
    config = OPTConfig(vocab_size=len(tok), hidden_size=W, ffn_dim=2 * W, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, word_embed_proj_dim=W, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    OPTForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def gemma2(out: Path) -> None:
    """The embedding multiplies by sqrt(hidden) inside its forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tokenizer(["<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>", pad="<pad>",
                    chat_template=template(TURNS))
    Gemma2ForCausalLM(text_config(Gemma2Config, tok, head_dim=8)).save_pretrained(out)
    tok.save_pretrained(out)


def gemma3_text(out: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tokenizer(["<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>", pad="<pad>",
                    chat_template=template(TURNS))
    Gemma3ForCausalLM(text_config(Gemma3TextConfig, tok, head_dim=8, sliding_window=64)).save_pretrained(out)
    tok.save_pretrained(out)


TEXT = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "mistral": mistral, "phi3": phi3, "gpt_neox": gpt_neox,
        "gpt2": gpt2, "opt": opt, "gemma2": gemma2, "gemma3_text": gemma3_text}


def build(name: str, out: Path) -> Path:
    """Build family `name` into folder `out` with fixed random weights."""
    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        {**TEXT, **VISION}[name](out)
    return out


VISION: dict = {}


# ---------------------------------------------------------------- image-text families


def llava(out: Path) -> None:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tokenizer(["<image>"], chat_template=IMAGES_FIRST)
    config = LlavaConfig(vision_config=clip_vision(), text_config=text_config(LlamaConfig, tok),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(out)


def llava_next(out: Path) -> None:
    """Images cut into tiles by aspect ratio: `image_sizes` beside the pixels."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tokenizer(["<image>"], chat_template=IMAGES_FIRST)
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = LlavaNextConfig(vision_config=clip_vision(), text_config=text_config(LlamaConfig, tok),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                       image_token="<image>", num_additional_image_tokens=1).save_pretrained(out)


def _qwen_vl(out: Path, five: bool) -> None:
    """M-RoPE: the model computes 3-D positions from `image_grid_thw` and `mm_token_type_ids`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = tokenizer(specials, bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
                    chat_template=template(CHATML, "<|vision_start|><|image_pad|><|vision_end|>"))
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("image_token_id", "<|image_pad|>"),
                                                        ("video_token_id", "<|video_pad|>"),
                                                        ("vision_start_token_id", "<|vision_start|>"),
                                                        ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tok), hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=LAYERS, embed_dim=W, hidden_size=W, num_heads=HEADS, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if five:
        vision.update(intermediate_size=2 * W, out_hidden_size=W, fullatt_block_indexes=[1], window_size=32)
        vision.pop("embed_dim")
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)
    else:
        vision.update(mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    # Saved as a Qwen2-VL checkpoint's processor files lie; its video processor needs torchvision, which
    # does not import beside a CPU-only torch, so minigpt5 loads the processor without it.
    Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                             max_pixels=64 * 64).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(tok.chat_template)
    (out / "processor_config.json").write_text('{"processor_class": "%s"}' % (
        "Qwen2_5_VLProcessor" if five else "Qwen2VLProcessor"))


def qwen2_vl(out: Path) -> None:
    _qwen_vl(out, five=False)


def qwen2_5_vl(out: Path) -> None:
    _qwen_vl(out, five=True)


VISION.update({"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl})


def _idefics(out: Path, smol: bool) -> None:
    """Images split into tiles plus a global view; batches carry an image-count axis and a pixel mask."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig
    from transformers import SmolVLMForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid],
                    bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>")
    text = dict(vocab_size=len(tok), hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  image_size=32, patch_size=8)
    image_token = tok.convert_tokens_to_ids("<image>")
    cls, model = (SmolVLMConfig, SmolVLMForConditionalGeneration) if smol else \
        (Idefics3Config, Idefics3ForConditionalGeneration)
    model(cls(text_config=text, vision_config=vision, image_token_id=image_token, scale_factor=2)).save_pretrained(out)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    if smol:  # its processor has a video processor too: saved as files, loaded without it (see qwen2_vl)
        images.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "processor_config.json").write_text('{"processor_class": "SmolVLMProcessor", "image_seq_len": 4}')
    else:
        from transformers import Idefics3Processor

        Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4).save_pretrained(out)


def idefics3(out: Path) -> None:
    _idefics(out, smol=False)


def smolvlm(out: Path) -> None:
    _idefics(out, smol=True)


def paligemma(out: Path) -> None:
    """A prefix-LM: the prompt and its images attend both ways, the target causally (token_type_ids)."""
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tokenizer(["<image>"], bos="<bos>", eos="<eos>", pad="<pad>", extra={"image_token": "<image>"})
    text = text_config(Gemma2Config, tok, head_dim=8)
    config = PaliGemmaConfig(vision_config=siglip_vision(), text_config=text, projection_dim=W,
                             image_token_id=tok.convert_tokens_to_ids("<image>"))
    PaliGemmaForConditionalGeneration(config).save_pretrained(out)
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    PaliGemmaProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)


def gemma3(out: Path) -> None:
    """Images attend within themselves both ways (token_type_ids); the embedding scales by sqrt(width)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    marks = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = tokenizer(["<start_of_turn>", "<end_of_turn>", *marks.values()], bos="<bos>", eos="<eos>", pad="<pad>",
                    extra=marks, chat_template=template(TURNS, "<start_of_image>"))
    text = text_config(Gemma3TextConfig, tok, head_dim=8, sliding_window=64)
    config = Gemma3Config(text_config=text, vision_config=siglip_vision(), mm_tokens_per_image=4,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    Gemma3ForConditionalGeneration(config).save_pretrained(out)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                    chat_template=tok.chat_template, image_seq_length=4).save_pretrained(out)


def mllama(out: Path) -> None:
    """Cross-attention to image tiles: `cross_attention_mask`, aspect ratio ids and masks per image."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"],
                    bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                    chat_template=template(HEADERS, "<|image|>"))
    vocab = len(tok)
    tok.add_tokens(["<|image|>"], special_tokens=True)  # past the text vocabulary, as in Llama 3.2 Vision
    text = dict(vocab_size=vocab, hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS + 1,
                num_attention_heads=HEADS, num_key_value_heads=2, cross_attention_layers=[1],
                max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS, num_global_layers=1,
                  attention_heads=HEADS, image_size=32, patch_size=8, max_num_tiles=2, vision_output_dim=2 * W,
                  intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision,
                                                image_token_index=vocab)).save_pretrained(out)
    MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2),
                    tokenizer=tok, chat_template=tok.chat_template).save_pretrained(out)


VISION.update({"idefics3": idefics3, "smolvlm": smolvlm, "paligemma": paligemma, "gemma3": gemma3, "mllama": mllama})


def blip_2(out: Path) -> None:
    """BLIP-2 hosting a Llama, as MiniGPT-4 is laid out: each image's query embeddings spliced where the prompt
    holds its image tokens (its processor would put them before the text)."""
    from minigpt5_cli.builders import tiny

    tiny.build("tiny:blip2", out)


VISION["blip_2"] = blip_2
