"""Checkpoint folders: only the trained weights, in Hugging Face formats, and what they fit.

A checkpoint holds `vokens.safetensors` (the voken rows), `mapper/` (`FeatureMapper.save_pretrained`),
`adapter/` (the PEFT adapter, stage 2; prefix tuning also keeps `prefix_encoder.safetensors`),
`minigpt5.json` (the backbones it fits) and `recipe.yaml`; an imported checkpoint may also hold
`base_rows.safetensors`, the LLM's whole input embedding and LM head, which then replace the base's.
Training adds optimizer and scheduler state for `--resume` (`training/state.py`) and
`trainer_state.json`. Every file is safetensors or JSON: reading a checkpoint runs no code that came
with it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from minigpt5_cli import files
from minigpt5_cli.errors import UserError

# What reading a truncated or overwritten checkpoint file raises: safetensors (SafetensorError), JSON
# (ValueError), the file system, torch's archive reader (RuntimeError) and its allow-list unpickler
# (EOFError, UnpicklingError) for files of earlier versions.
DAMAGED = (RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, ValueError, OSError)
META_FILE = "minigpt5.json"
PREFIX_FILE = "prefix_encoder.safetensors"
VOKENS_FILE = "vokens.safetensors"
BASE_ROWS_FILE = "base_rows.safetensors"  # optional: "embed" and "head", the LLM's whole matrices
ADAPTER_FILE = "adapter_model.safetensors"  # in adapter/, as PEFT names it
MAPPER_CONFIG, MAPPER_FILE = "config.json", "diffusion_pytorch_model.safetensors"  # in mapper/, as diffusers names them
STEP_FILE = "trainer_state.json"  # the step it was written at; written last: a folder without it is incomplete
_NAME = re.compile(r"checkpoint-(\d+)$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class Malformed(ValueError):
    """A checkpoint file that reads, but does not hold what it should (JSON of another shape)."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if _NAME.search(p.name) and (p / STEP_FILE).is_file()]
    return sorted(found, key=_step_number)


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose latest checkpoint is taken."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"checkpoint not found: {folder}")
    found = checkpoints(folder)
    return found[-1] if found else folder


def damaged(folder: Path, path: Path, err: Exception) -> UserError:
    """A one-line error naming `path`, the file of checkpoint `folder` that is missing or does not load,
    and the checkpoint before it."""
    if isinstance(err, FileNotFoundError):
        what = f"{path} is missing"
    elif isinstance(err, UserError):  # files.read_text's, which names the file
        what = str(err)
    else:
        what = f"{path} does not load" + (f" ({err})" if isinstance(err, Malformed) else "")
    earlier = [c for c in checkpoints(folder.parent) if _step_number(c) < _step_number(folder)]
    advice = (f"use the checkpoint before it, {earlier[-1]} (remove {folder} to resume from there)" if earlier
              else "no earlier checkpoint is kept")
    return UserError(f"checkpoint {folder} is damaged: {what}; {advice}")


@contextmanager
def reading(folder: Path, path: Path):
    """Within: reading `path`, a file of checkpoint `folder`. A missing, damaged or malformed file ends
    in the one-line error of `damaged` naming it."""
    try:
        yield
    except DAMAGED as e:
        raise damaged(folder, path, e) from None


@contextmanager
def writing(path: Path):
    """Within: writing `path` (a file, or a folder a library fills). safetensors reports a full disk as
    its own error; it becomes the OSError it wraps, naming `path`, as the file system's own errors do."""
    try:
        yield
    except SafetensorError as e:
        found = _OS_ERROR.search(str(e))
        if not found:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
    except OSError as e:
        if e.errno is None or e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def read_json(folder: Path, path: Path) -> dict:
    """The JSON object in `path`, a file of checkpoint `folder`; anything else there is damage."""
    try:
        text = files.read_text(path)
    except UserError as e:  # unreadable, not UTF-8, too large
        raise damaged(folder, path, e if path.exists() else FileNotFoundError()) from None
    with reading(folder, path):
        doc = files.loads(text)
        if not isinstance(doc, dict):
            raise Malformed(f"it holds {type(doc).__name__ if doc is not None else 'null'}, not an object")
    return doc


def is_checkpoint_name(folder: Path) -> bool:
    """Whether `folder` is named as a run's checkpoint (`checkpoint-STEP`)."""
    return bool(_NAME.search(folder.name))


def owners(folder: Path) -> list[Path]:
    """The folders a model folder's files belong to, resolved: itself, and for a run's checkpoint its run."""
    folder = folder.resolve()
    return [folder, folder.parent] if is_checkpoint_name(folder) else [folder]


def _step_number(folder: Path) -> int:
    """The step in a checkpoint folder's name; -1 for another name."""
    found = _NAME.search(folder.name)
    return int(found.group(1)) if found else -1


def describe(model) -> dict:
    """What a checkpoint of `model` fits: the backbones' kinds and sizes, the vokens, the adapter."""
    length, width = model.generator.cond_shape
    text = model.llm_info.model.config.get_text_config()
    return {
        "llm": model.llm_info.name, "generator": model.generator.name, "llm_width": model.llm_info.width,
        "llm_type": model.llm_info.model.config.model_type, "llm_layers": text.num_hidden_layers,
        "first_voken_id": model.first_voken, "n_vokens": model.vokens.n, "cond_shape": [length, width],
        "pooled": model.generator.pooled_width,
        "adapter": model.adapter_kind,
    }


def save(model, folder: str | Path) -> None:
    """Write only the trained weights of `model` (a MiniGPT5), in Hugging Face formats."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with writing(folder / VOKENS_FILE):
        save_file({k: v.detach().contiguous() for k, v in model.vokens.state_dict().items()}, folder / VOKENS_FILE)
    with writing(folder / "mapper"):
        model.mapper.save_pretrained(folder / "mapper")
    kind = model.adapter_kind
    if kind != "none":
        # Adapter weights only: PEFT would add the whole embedding and LM head of a resized vocabulary
        # (about 0.5 GB at 7B); the voken rows are in VOKENS_FILE, and the rest are the base model's.
        with writing(folder / "adapter"):
            model.llm.save_pretrained(folder / "adapter", save_embedding_layers=False)
    if kind == "prefix":
        # PEFT saves the prefix as its computed key/values, which is enough for inference but not
        # for training on: keep the projection's own weights beside it.
        with writing(folder / PREFIX_FILE):
            save_file({k: v.detach().contiguous() for k, v in model.llm.prompt_encoder.state_dict().items()},
                      folder / PREFIX_FILE)
    rows = getattr(model, "base_rows", None)
    if rows is not None:  # frozen, so as they were read (a sharded model need not gather them)
        with writing(folder / BASE_ROWS_FILE):
            save_file(rows, folder / BASE_ROWS_FILE)
    with writing(folder / META_FILE):
        (folder / META_FILE).write_text(json.dumps(describe(model), indent=2))


def load(model, folder: str | Path, adapter: bool = True) -> None:
    """Load weights written by `save` into `model`; refuse a checkpoint made for other backbones, and
    any weight file that lacks a tensor the model needs or holds one it does not."""
    unexpected = model.load_state_dict(read(model, folder, adapter), strict=False).unexpected_keys
    if unexpected:  # read() names the model's own parameters
        raise RuntimeError(f"checkpoint names no parameter of the model: {unexpected[:3]}")


def read(model, folder: str | Path, adapter: bool = True) -> dict:
    """The tensors of checkpoint `folder`, checked against `model`, by the model's parameter names (so
    a sharded model can load them with torch's distributed state-dict functions). Only safetensors and
    JSON are read; a file that is missing or does not load is named."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{folder} is not a minigpt5 checkpoint (no {META_FILE})")
    check_compatible(read_json(folder, meta_path), describe(model), folder, adapter)
    state = _strict(model.vokens, tensors(folder, folder / VOKENS_FILE), folder / VOKENS_FILE, "vokens.")
    # A setting the saved config lacks (one added since it was written) has the mapper's default.
    config = {**_defaults(type(model.mapper)), **read_json(folder, folder / "mapper" / MAPPER_CONFIG)}
    diff = [f"{k} {config.get(k)} there, {v} here" for k, v in model.mapper.config.items()
            if not k.startswith("_") and config.get(k) != v]
    if diff:
        raise UserError(f"checkpoint {folder}: its mapper differs from the recipe's ({', '.join(diff)})")
    path = folder / "mapper" / MAPPER_FILE
    state.update(_strict(model.mapper, tensors(folder, path), path, "mapper."))
    kind = model.adapter_kind
    if adapter and kind == "prefix":
        state.update(_strict(model.llm.prompt_encoder, tensors(folder, folder / PREFIX_FILE), folder / PREFIX_FILE,
                             "llm.prompt_encoder."))
    elif adapter and kind == "lora":
        state.update(_read_adapter(model, folder, folder / "adapter" / ADAPTER_FILE))
    path = folder / BASE_ROWS_FILE
    if path.is_file():
        names, params = row_parameters(model)
        rows = tensors(folder, path)
        bad = _misfit(params, rows)
        if bad:
            raise UserError(f"{path} does not fit this model: {bad}")
        state.update({names[k]: v for k, v in rows.items()})
        model.base_rows = rows  # `save` writes them again
    return state


def row_parameters(model) -> tuple[dict, dict]:
    """The LLM's input embedding ("embed") and LM head ("head", unless tied to it): their parameter names in
    `model`, and the parameters."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names, params = {}, {}
    for key, module in (("embed", model.llm.get_input_embeddings()), ("head", model.llm.get_output_embeddings())):
        if module is not None and by_id.get(id(module.weight)) not in (None, *names.values()):
            names[key], params[key] = by_id[id(module.weight)], module.weight
    return names, params


def _defaults(cls) -> dict:
    """The default of each keyword of `cls`'s constructor."""
    import inspect

    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def tensors(folder: Path, path: Path) -> dict:
    """The tensors of `path`, a safetensors file of checkpoint `folder`."""
    from safetensors.torch import load_file

    with reading(folder, path):
        return load_file(path)


def _misfit(wanted: dict, state: dict) -> str:
    """What keeps `state` from being exactly the tensors `wanted` holds (same names and shapes), or ''."""
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    shapes = [f"{k} {list(state[k].shape)} there, {list(wanted[k].shape)} here"
              for k in sorted(set(wanted) & set(state)) if tuple(state[k].shape) != tuple(wanted[k].shape)]
    return "; ".join(f"{what} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
                     for what, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", shapes))
                     if keys)


def _strict(module, state: dict, where: Path, prefix: str) -> dict:
    """`state` (the tensors of `module`) under the model's names, when its keys and shapes are exactly the
    module's (a file missing a tensor is refused rather than leaving random weights)."""
    bad = _misfit(module.state_dict(), state)
    if bad:
        raise UserError(f"{where} does not fit this model: {bad}")
    return {prefix + k: v for k, v in state.items()}


def _read_adapter(model, folder: Path, path: Path) -> dict:
    """The PEFT adapter weights in `path` (as PEFT writes them; its config is not read: the recipe says
    what adapter the model has); every adapter tensor must be there. Its keys are PEFT's: the LLM's
    parameter names without the adapter's name."""
    from peft import get_peft_model_state_dict

    state = tensors(folder, path)
    wanted = get_peft_model_state_dict(model.llm, save_embedding_layers=False)  # as `save` writes it
    bad = _misfit(wanted, state)
    if bad:
        raise UserError(f"checkpoint {folder}: its adapter does not fit this model ({bad})")
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
