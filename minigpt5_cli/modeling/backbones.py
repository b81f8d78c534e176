"""Loading the frozen LLM from a hub id or a local folder: any `AutoModelForCausalLM` (text only) or
`AutoModelForImageTextToText` (prompts can hold images), with its own processor. The generator is
loaded by `generators.py`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt5_cli import hub
from minigpt5_cli.errors import UserError


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


def remote_code(folder: Path, asks: bool, trusted: bool, llm: str) -> bool:
    """Whether the LLM of the model folder `folder` (a checkpoint, run or bundle) may run code of its
    own: only when its recipe asks for it (`asks`) and the person running the command passed
    --trust-remote-code (`trusted`). A folder from elsewhere never switches it on by itself: asking
    without the flag is refused."""
    if asks and not trusted:
        raise UserError(f"{folder}: its recipe asks to run the code in the LLM {llm!r}; pass --trust-remote-code "
                        "if you trust it")
    return asks


def load_llm(name: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
             empty: bool = False) -> LLM:
    """The LLM with its tokenizer and processor. `empty`: built from its config with fresh weights, none
    read (for `train --plan`, under accelerate's `init_empty_weights`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    hub.quiet()
    path = hub.resolve(name, shapes_only=empty)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise hub.load_error("LLM", name, e, hub.files_hint(name) if empty else hub.OFFLINE_HINT) from None
    multimodal = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if not multimodal and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UserError(f"the LLM {name!r} is a {config.model_type!r} model, neither a causal LM nor an "
                        "image-text-to-text model; minigpt5 needs one of those")
    try:
        cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code) if empty else \
            cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        processor = load_processor(path, name, trust_remote_code) if multimodal else None
        tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise hub.load_error("LLM", name, e, hub.files_hint(name) if empty else hub.OFFLINE_HINT) from None
    if tokenizer.pad_token is None:  # the paper pads with eos
        tokenizer.pad_token = tokenizer.eos_token
    return LLM(model=model, tokenizer=tokenizer, processor=processor, name=name)


def load_processor(path: str, name: str, trust_remote_code: bool = False):
    """The model's own processor. Where one of its parts cannot load because a package is missing (the
    video processors of Qwen2-VL and SmolVLM need torchvision, which does not import beside a CPU-only
    torch), the processor is built from its image processor and tokenizer alone: images, not video."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, AttributeError) as e:
        missing = _missing_package(e)
        if missing is None:
            raise
        try:
            return _images_only(path, trust_remote_code)
        except (ImportError, ValueError, AttributeError, TypeError) as again:
            missing = _missing_package(again) or missing  # the images-only processor may need a package too
            raise UserError(f"the processor of {name!r} needs the package {missing!r}: pip install {missing}") from None


def _missing_package(err: Exception) -> str | None:
    """The package an import failed on, from the error or its message; None for any other error."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        return err.name.split(".")[0]
    text = str(err).lower()
    return next((p for p in ("torchvision", "num2words", "av", "decord", "librosa") if p in text.split("`")
                 or f"requires the {p}" in text or f" {p} " in f" {text} "), None)


def _images_only(path: str, trust_remote_code: bool):
    import json

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(path)
    settings = json.loads((folder / "processor_config.json").read_text()) if (folder / "processor_config.json").is_file() \
        else {}
    cls = getattr(transformers, settings.pop("processor_class", ""), None)
    if cls is None:
        raise ValueError("no processor_class in processor_config.json")

    class ImagesOnly(cls):  # its attributes come from this signature: no video processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            video = {"video_processor": None} if "video_processor" in inspect.signature(cls.__init__).parameters else {}
            cls.__init__(self, image_processor, tokenizer, chat_template=chat_template, **video, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__
    template = folder / "chat_template.jinja"
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    known = inspect.signature(cls.__init__).parameters
    return ImagesOnly(AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code), tokenizer,
                      chat_template=template.read_text() if template.is_file() else tokenizer.chat_template,
                      **{k: v for k, v in settings.items() if k in known})
