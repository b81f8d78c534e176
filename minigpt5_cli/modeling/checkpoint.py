"""Checkpoint folders: only the trained weights, in Hugging Face formats, and what they fit.

A checkpoint holds `vokens.safetensors` (the voken rows), `mapper/` (`FeatureMapper.save_pretrained`),
`adapter/` (the PEFT adapter, stage 2; prefix tuning also keeps `prefix_encoder.safetensors`),
`minigpt5.json` (the backbones it fits) and `recipe.yaml`. Training adds optimizer and scheduler
state for `--resume` (`training/state.py`) and `trainer_state.json`.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from safetensors import SafetensorError

from minigpt5_cli.errors import UserError
from minigpt5_cli.modeling.mapper import FeatureMapper

# What loading a truncated or overwritten state file raises: torch's archive reader (RuntimeError),
# pickle (EOFError, UnpicklingError), safetensors (SafetensorError), JSON (ValueError), the file system.
DAMAGED = (RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, ValueError, OSError)
META_FILE = "minigpt5.json"
PREFIX_FILE = "prefix_encoder.safetensors"
VOKENS_FILE = "vokens.safetensors"
STATE_FILE = "trainer_state.json"  # written last: a folder without it is incomplete
_NAME = re.compile(r"checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if _NAME.search(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose latest checkpoint is taken."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"checkpoint not found: {folder}")
    found = checkpoints(folder)
    return found[-1] if found else folder


def damaged(folder: Path, err: Exception) -> UserError:
    """A one-line error naming the file of checkpoint `folder` that is missing or does not load, and
    the checkpoint before it."""
    if isinstance(err, FileNotFoundError) and err.filename:
        what = f"{err.filename} is missing"
    else:
        bad = next((f for f in sorted(folder.rglob("*")) if f.is_file() and not _loads(f)), None)
        what = f"{bad} does not load" if bad else f"it does not load ({type(err).__name__})"
    earlier = [c for c in checkpoints(folder.parent) if _step(c) < _step(folder)]
    advice = (f"use the checkpoint before it, {earlier[-1]} (remove {folder} to resume from there)" if earlier
              else "no earlier checkpoint is kept")
    return UserError(f"checkpoint {folder} is damaged: {what}; {advice}")


def is_checkpoint_name(folder: Path) -> bool:
    """Whether `folder` is named as a run's checkpoint (`checkpoint-STEP`)."""
    return bool(_NAME.search(folder.name))


def _step(folder: Path) -> int:
    found = _NAME.search(folder.name)
    return int(found.group(1)) if found else -1


def _loads(path: Path) -> bool:
    """Whether a checkpoint file reads back whole."""
    import torch
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix in (".bin", ".pt", ".pkl"):  # accelerate writes all three with torch.save
            torch.load(path, map_location="cpu", weights_only=False)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except DAMAGED:
        return False
    return True


def describe(model) -> dict:
    """What a checkpoint of `model` fits: the backbones' kinds and sizes, the vokens, the adapter."""
    length, width = model.generator.cond_shape
    text = model.llm_info.model.config.get_text_config()
    return {
        "llm": model.llm_info.name, "generator": model.generator.name, "llm_width": model.llm_info.width,
        "llm_type": model.llm_info.model.config.model_type, "llm_layers": text.num_hidden_layers,
        "first_voken_id": model.first_voken, "n_vokens": model.vokens.n, "cond_shape": [length, width],
        "pooled": model.generator.pooled_width,
        "adapter": model.recipe.adapter.kind,
    }


def save(model, folder: str | Path) -> None:
    """Write only the trained weights of `model` (a MiniGPT5), in Hugging Face formats."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.vokens.state_dict().items()}, folder / VOKENS_FILE)
    model.mapper.save_pretrained(folder / "mapper")
    kind = model.recipe.adapter.kind
    if kind != "none":
        # Adapter weights only: PEFT would add the whole embedding and LM head of a resized vocabulary
        # (about 0.5 GB at 7B); the voken rows are in VOKENS_FILE, and the rest are the base model's.
        model.llm.save_pretrained(folder / "adapter", save_embedding_layers=False)
    if kind == "prefix":
        # PEFT saves the prefix as its computed key/values, which is enough for inference but not
        # for training on: keep the projection's own weights beside it.
        save_file({k: v.detach().contiguous() for k, v in model.llm.prompt_encoder.state_dict().items()},
                  folder / PREFIX_FILE)
    (folder / META_FILE).write_text(json.dumps(describe(model), indent=2))


def load(model, folder: str | Path, adapter: bool = True) -> None:
    """Load weights written by `save` into `model`; refuse a checkpoint made for other backbones, and
    any weight file that lacks a tensor the model needs or holds one it does not."""
    unexpected = model.load_state_dict(read(model, folder, adapter), strict=False).unexpected_keys
    if unexpected:  # read() names the model's own parameters
        raise RuntimeError(f"checkpoint names no parameter of the model: {unexpected[:3]}")


def read(model, folder: str | Path, adapter: bool = True) -> dict:
    """The tensors of checkpoint `folder`, checked against `model`, by the model's parameter names (so
    a sharded model can load them with torch's distributed state-dict functions)."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{folder} is not a minigpt5 checkpoint (no {META_FILE})")
    try:
        check_compatible(json.loads(meta_path.read_text()), describe(model), folder, adapter)
        return _read(model, folder, adapter)
    except DAMAGED as e:
        raise damaged(folder, e) from None


def _read(model, folder: Path, adapter: bool) -> dict:
    from safetensors.torch import load_file

    state = _strict(model.vokens, load_file(folder / VOKENS_FILE), folder / VOKENS_FILE, "vokens.")
    saved = _load_mapper(folder / "mapper")
    diff = [f"{k} {saved.config.get(k)} there, {v} here" for k, v in model.mapper.config.items()
            if not k.startswith("_") and saved.config.get(k) != v]
    if diff:
        raise UserError(f"checkpoint {folder}: its mapper differs from the recipe's ({', '.join(diff)})")
    state.update({f"mapper.{k}": v for k, v in saved.state_dict().items()})
    kind = model.recipe.adapter.kind
    if adapter and kind == "prefix":
        state.update(_strict(model.llm.prompt_encoder, load_file(folder / PREFIX_FILE), folder / PREFIX_FILE,
                             "llm.prompt_encoder."))
    elif adapter and kind == "lora":
        state.update(_read_adapter(model, folder / "adapter"))
    return state


def _load_mapper(folder: Path) -> FeatureMapper:
    """The mapper in `folder`, read by `from_pretrained`; a weight file that lacks a tensor or holds an
    extra one is refused rather than filled with random weights."""
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its warnings would repeat the error below
    try:
        mapper, info = FeatureMapper.from_pretrained(folder, output_loading_info=True)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise UserError(f"{folder} does not fit this model: " + "; ".join(
            f"{k.replace('_keys', '')} {', '.join(map(str, v[:3]))}" for k, v in bad.items()))
    return mapper


def _strict(module, state: dict, where: Path, prefix: str) -> dict:
    """`state` (the tensors of `module`) under the model's names, when its keys are exactly the module's."""
    missing, unexpected = (sorted(set(module.state_dict()) - set(state)), sorted(set(state) - set(module.state_dict())))
    if missing or unexpected:
        raise UserError(f"{where} does not fit this model: " + "; ".join(
            f"{what} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    return {prefix + k: v for k, v in state.items()}


def _read_adapter(model, folder: Path) -> dict:
    """The PEFT adapter in `folder`, read with PEFT's own loader; every adapter tensor must be there. Its
    keys are PEFT's: the LLM's parameter names without the adapter's name."""
    from peft import get_peft_model_state_dict, load_peft_weights

    state = load_peft_weights(str(folder), device="cpu")
    wanted = get_peft_model_state_dict(model.llm, save_embedding_layers=False)  # as `save` writes it
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        keys = missing or unexpected
        raise UserError(f"checkpoint {folder}: its adapter does not fit this model "
                        f"({'missing' if missing else 'unexpected'} {', '.join(keys[:3])})")
    name = f".{model.llm.active_adapter}."
    names = {n.replace(name, "."): f"llm.{n}" for n, _ in model.llm.named_parameters()}
    return {names[k]: v for k, v in state.items()}


def check_compatible(saved: dict, current: dict, folder: Path, adapter: bool) -> None:
    keys = ["llm_type", "llm_layers", "llm_width", "first_voken_id", "n_vokens", "cond_shape", "pooled"]
    for key in keys + (["adapter"] if adapter else []):
        if saved.get(key) != current[key]:
            raise UserError(
                f"checkpoint {folder} was made for other backbones: {key} is {saved.get(key)} there, "
                f"{current[key]} here (checkpoint: {saved.get('llm')} + {saved.get('generator')})"
            )
