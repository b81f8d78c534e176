"""Loading models by hub id or local folder: quietly, with one-line errors, and the device to run on."""

from __future__ import annotations

import importlib
import logging

import torch

from minigpt5_cli.errors import UserError

# What "this model cannot be loaded here" looks like: a missing or unreadable file, the hub out of
# reach offline (OSError), a config or file that is not what it should be (ValueError). Any other
# exception is a bug and propagates.
UNAVAILABLE = (OSError, ValueError)
OFFLINE_HINT = "offline, pass a local folder made with save_pretrained"
# Backbones named by scheme, built locally by these modules (`builders/`): never a path or a hub id.
BUILDERS = {"tiny:": "minigpt5_cli.builders.tiny", "toy:": "minigpt5_cli.builders.tiny",
            "paper:": "minigpt5_cli.builders.paper"}
NAMED = tuple(BUILDERS)


class _DropTorchvisionFallback(logging.Filter):
    """transformers warns on every run that an image processor falls back from torchvision to PIL,
    which is what a CPU-only torch needs: nothing for a user to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


class _DropSafetyNotice(logging.Filter):
    """diffusers warns whenever a Stable Diffusion pipeline is built without its safety checker, which
    minigpt5 never loads: it is not part of the conditioning, and its outputs are its research results."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "You have disabled the safety checker" not in record.getMessage()


# Where diffusers warns of it: the pipelines minigpt5 builds without a safety checker.
SAFETY_LOGGERS = ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",)


def _filter(name: str, cls: type[logging.Filter]) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, cls) for f in logger.filters):
        logger.addFilter(cls())


def quiet(errors_only: bool = False) -> None:
    """Per-file loading bars from transformers and diffusers drown our own progress display."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    _filter("transformers.utils.import_utils", _DropTorchvisionFallback)
    for name in SAFETY_LOGGERS:
        _filter(name, _DropSafetyNotice)
    if errors_only:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()  # "could not reach the Hub" when offline by choice


def resolve(name: str, shapes_only: bool = False) -> str:
    """A local folder for a backbone named by scheme, built into the cache the first time; any other
    name (a hub id, a folder) as it is. Names of configs without weights (`paper:`) only where
    `shapes_only` says no weights are read."""
    if not name.startswith(NAMED):
        return name
    from minigpt5_cli.builders import common

    builder = importlib.import_module(BUILDERS[name.split(":")[0] + ":"])
    if name not in builder.NAMES:
        known = [n for module in dict.fromkeys(BUILDERS.values()) for n in importlib.import_module(module).NAMES]
        raise UserError(f"unknown tiny backbone {name!r}; choose one of {', '.join(known)}")
    if not builder.WEIGHTS and not shapes_only:
        raise UserError(f"{name} describes the model's shapes, without weights: use it with train --plan")
    return common.cached(name, builder.build)


def files_hint(name: str) -> str:
    """Where the configs and tokenizer files of `name` come from when its weights are not wanted."""
    return (f"give its config and tokenizer files, without weights: hf download {name} --exclude '*.safetensors' "
            "--exclude '*.bin' --exclude '*.ckpt' --exclude '*.pth' (once, online), or a local folder holding them "
            "(the paper's backbones as shapes: model.llm=paper:llava-1.5-7b model.generator=paper:sd-2.1-base)")


def load_error(what: str, name: str, err: Exception, hint: str) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load the {what} {name!r} ({first[:300]}); {hint}")


def pick_device(device: str | None) -> str:
    """The device asked for, checked, or cuda when there is one, else cpu."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; try cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device
