"""Training state in a checkpoint folder, the same under one process, DDP and FSDP: the trained
weights (`modeling/checkpoint.py`'s files), the optimizer state keyed by parameter name (torch's
distributed-checkpoint state dicts, gathered whole), the scheduler, the fp16 loss scaler.

Only safetensors and JSON: the optimizer's tensors in `optimizer.safetensors` (keyed PARAMETER/KEY),
everything else (its parameter groups, the scheduler, the scaler) as JSON, so resuming from a
checkpoint someone else wrote runs none of their code. The `.bin` files of earlier versions (torch.save)
are read with torch's allow-list unpickler only, which refuses anything but tensors and plain values.

Frozen backbones are never written, under FSDP neither (accelerate's FSDP checkpoint would write
every shard of them). No RNG state is kept: every micro-batch reseeds from (seed, its index), and
the data order follows from the step, so a resumed run replays the same steps.
"""

from __future__ import annotations

import json
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.modeling.checkpoint import Malformed

OPTIMIZER_FILE, OPTIMIZER_TENSORS = "optimizer.json", "optimizer.safetensors"
SCHEDULER_FILE, SCALER_FILE = "scheduler.json", "scaler.json"
LEGACY = {OPTIMIZER_FILE: "optimizer.bin", SCHEDULER_FILE: "scheduler.bin", SCALER_FILE: "scaler.bin"}


def _trained(model) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every tensor a checkpoint holds: the vokens, the whole mapper
    (frozen parts too), and the adapter's trainable tensors."""
    found = [(m, n) for part in (model.vokens, model.mapper) for m in part.modules() for n in m._parameters
             if m._parameters[n] is not None]
    found += [(m, n) for m in model.llm.modules() for n, p in m._parameters.items() if p is not None and p.requires_grad]
    return list(dict.fromkeys(found))


@contextmanager
def gathered(model):
    """Within: the checkpoint's tensors whole on every process (FSDP shards them). Collective: every
    process enters."""
    from torch.distributed.tensor import DTensor

    swapped = []
    for module, name in _trained(model):
        p = module._parameters[name]
        if isinstance(p, DTensor):
            module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
            swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def save(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """Write the state of a run into `folder` (every process calls this; the main one writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    raw = accelerator.unwrap_model(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim = get_optimizer_state_dict(model, _plain(optimizer), options=options)
    with gathered(raw):
        if accelerator.is_main_process:
            checkpoint.save(raw, folder)
    if accelerator.is_main_process:
        _save_optimizer(optim, folder)
        _save_json(scheduler.state_dict(), folder / SCHEDULER_FILE)
        if accelerator.scaler is not None:
            _save_json(accelerator.scaler.state_dict(), folder / SCALER_FILE)


def load(accelerator, model, optimizer, scheduler, folder: Path) -> int:
    """Read what `save` wrote back into a prepared model, its optimizer and scheduler; return the step
    the checkpoint was written at. A file that is missing, does not load or does not fit ends in one
    line naming it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    step = read_step(folder)
    raw = accelerator.unwrap_model(model)
    # Whole tensors in, each process keeps its shards (a plain copy without FSDP).
    set_model_state_dict(model, checkpoint.read(raw, folder), options=StateDictOptions(full_state_dict=True,
                                                                                          strict=False))
    optim, path = _read_optimizer(folder)
    if path.name != OPTIMIZER_FILE and all(isinstance(k, int) for k in optim["state"]):  # 0.x's, keyed by position
        with checkpoint.reading(folder, path):  # torch checks the groups' sizes (ValueError)
            _plain(optimizer).load_state_dict(optim)
    else:
        with checkpoint.reading(folder, path):
            optim = _fitted(optim, _plain(optimizer), {id(p): n for n, p in raw.named_parameters()})
        set_optimizer_state_dict(model, _plain(optimizer), optim, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(_read_plain(folder, SCHEDULER_FILE, scheduler.state_dict(),
                                          required=[k for k in scheduler.state_dict() if not k.startswith("_")]))
    # A run saved in fp32 (fp16 falls back to it without a GPU) has no loss scaler: a new one starts.
    if accelerator.scaler is not None and any((folder / n).exists() for n in (SCALER_FILE, LEGACY[SCALER_FILE])):
        current = accelerator.scaler.state_dict()
        accelerator.scaler.load_state_dict(_read_plain(folder, SCALER_FILE, current, required=list(current)))
    return step


def read_step(folder: Path) -> int:
    """The optimizer step checkpoint `folder` was written at (its `trainer_state.json`)."""
    path = folder / checkpoint.STEP_FILE
    doc = checkpoint.read_json(folder, path)
    step = doc.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise checkpoint.damaged(folder, path, Malformed(f"its step is {step!r:.40}, not a count of steps"))
    return step


def _save_json(doc, path: Path) -> None:
    with checkpoint.writing(path):
        path.write_text(json.dumps(doc))


def _save_optimizer(optim: dict, folder: Path) -> None:
    """The optimizer's tensors to OPTIMIZER_TENSORS, keyed PARAMETER/KEY; its parameter groups and
    plain values to OPTIMIZER_FILE, which names each tensor's key as {"tensor": KEY}."""
    from safetensors.torch import save_file

    found, state = {}, {}
    for name, values in optim["state"].items():
        state[name] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                found[f"{name}/{key}"] = value.detach().contiguous()
                value = {"tensor": f"{name}/{key}"}
            state[name][key] = value
    with checkpoint.writing(folder / OPTIMIZER_TENSORS):
        save_file(found, folder / OPTIMIZER_TENSORS)
    _save_json({"state": state, "param_groups": optim["param_groups"]}, folder / OPTIMIZER_FILE)


def _read_optimizer(folder: Path) -> tuple[dict, Path]:
    """The optimizer state `_save_optimizer` wrote (or an earlier version's optimizer.bin), with the file
    to name when it does not fit."""
    doc, path = _read_doc(folder, OPTIMIZER_FILE)
    if path.name == OPTIMIZER_FILE:
        found = checkpoint.tensors(folder, folder / OPTIMIZER_TENSORS)
    with checkpoint.reading(folder, path):
        if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict) or \
                not all(isinstance(v, dict) for v in doc["state"].values()) or \
                not isinstance(doc.get("param_groups"), list) or \
                not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in doc["param_groups"]):
            raise Malformed("it holds no optimizer state and parameter groups")
        if path.name == OPTIMIZER_FILE:
            state = {name: {key: _value(value, found, name, key) for key, value in values.items()}
                     for name, values in doc["state"].items()}
            doc = {"state": state, "param_groups": doc["param_groups"]}
    return doc, path


def _value(value, found: dict, name: str, key: str):
    """A value of parameter `name`'s optimizer state in OPTIMIZER_FILE: a number, or {"tensor": KEY} naming
    a tensor of OPTIMIZER_TENSORS (`found`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    ref = value.get("tensor") if isinstance(value, dict) and len(value) == 1 else None
    if not isinstance(ref, str):
        raise Malformed(f"its {key!r:.40} of {name!r:.80} is neither a number nor a tensor")
    if ref not in found:
        raise Malformed(f"{OPTIMIZER_TENSORS} lacks its tensor {ref!r:.80}")
    return found[ref]


def _fitted(optim: dict, optimizer, names: dict[int, str]) -> dict:
    """`optim`, keyed by parameter name, checked against `optimizer` (the same groups of the same
    parameters, each parameter's state of the keys and shapes this kind of optimizer keeps), with the
    group settings that are numbers (the learning rate as scheduled, betas) from `optim` and the rest
    (flags such as fused) the optimizer's own."""
    current = optimizer.param_groups
    if len(optim["param_groups"]) != len(current):
        raise Malformed(f"parameter groups: {len(optim['param_groups'])} there, {len(current)} here")
    params = {names.get(id(p)): p for group in current for p in group["params"]}
    groups = []
    for saved, now in zip(optim["param_groups"], current):
        if None not in params and sorted(map(str, saved["params"])) != sorted(names[id(p)] for p in now["params"]):
            raise Malformed("its parameter groups are not those of the trained parameters")
        settings = {k: v for k, v in now.items() if k != "params"}
        bad = [k for k in saved.keys() & settings.keys() if not _fits(saved[k], settings[k])]
        if bad:
            raise Malformed(f"its parameter group settings {', '.join(sorted(bad))} are not as the optimizer's")
        # JSON has no tuples (betas): give back the optimizer's types; a setting it lacks keeps the recipe's.
        groups.append({**settings, "params": saved["params"],
                       **{k: tuple(saved[k]) if isinstance(v, tuple) else saved[k]
                          for k, v in settings.items() if k in saved and _number(v)}})
    if None not in params:
        kept = _kept(optimizer)
        for name, values in optim["state"].items():
            if name not in params:
                raise Malformed(f"it holds state for {name!r:.80}, which is not trained")
            if values and values.keys() != kept.keys():  # none: the optimizer starts it
                raise Malformed(f"its state of {name} holds {', '.join(sorted(values))[:80] or 'nothing'}, not "
                                f"{', '.join(sorted(kept))}")
            shape = tuple(params[name].shape)
            bad = [k for k, v in values.items() if not torch.is_tensor(v) and kept[k] or
                   torch.is_tensor(v) and tuple(v.shape) != (shape if kept[k] else ())]
            if bad:
                raise Malformed(f"its {name} {bad[0]} is not of the shape {list(shape) if kept[bad[0]] else []}")
    return {"state": optim["state"], "param_groups": groups}


def _number(value) -> bool:
    """Whether `value` is a number, or a tuple or list of them (betas)."""
    if isinstance(value, (tuple, list)):
        return all(map(_number, value))
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kept(optimizer) -> dict[str, bool]:
    """The state `optimizer`'s kind keeps for each parameter, as {key: whether it is a tensor of the
    parameter's shape (else a scalar or a number)}: what one step of the same optimizer leaves."""
    import inspect

    p = nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.zeros_like(p)
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults name one it does not take
    probe = type(optimizer)([p], **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    probe.step()
    return {k: torch.is_tensor(v) and tuple(v.shape) == (2, 3) for k, v in probe.state[p].items()}


def _read_plain(folder: Path, name: str, current: dict, required: list[str]) -> dict:
    """The state of the scheduler or scaler (JSON, or an earlier version's .bin), of the structure of
    `current` (the keys in `required`, lists as long, numbers where numbers are)."""
    doc, path = _read_doc(folder, name)
    with checkpoint.reading(folder, path):
        missing = [k for k in required if not isinstance(doc, dict) or k not in doc]
        if missing or not _fits(doc, current):
            raise Malformed(f"it lacks {', '.join(missing)}" if missing and isinstance(doc, dict)
                            else f"it does not hold the state of this {name.split('.')[0]}")
    return doc


def _fits(saved, current) -> bool:
    """Whether `saved` has the structure of `current`: dicts whose common keys fit, lists of the same
    length, numbers for numbers, the same type for anything else."""
    if isinstance(current, dict):
        return isinstance(saved, dict) and all(_fits(saved[k], current[k]) for k in saved.keys() & current.keys())
    if isinstance(current, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(current) and all(map(_fits, saved, current))
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if torch.is_tensor(current):
        return torch.is_tensor(saved)
    if current is None:  # a flag left to torch (foreach) may be set in the file
        return saved is None or isinstance(saved, bool)
    return type(saved) is type(current)


def _read_doc(folder: Path, name: str) -> tuple[object, Path]:
    """The JSON document `name` of checkpoint `folder`, or, where only an earlier version's .bin is
    there, what that holds; and the file read."""
    path = folder / name
    if not path.exists() and (folder / LEGACY[name]).exists():
        return _legacy(folder, folder / LEGACY[name]), folder / LEGACY[name]
    return checkpoint.read_json(folder, path), path


def _legacy(folder: Path, path: Path):
    """A state file an earlier version wrote with torch.save, read with torch's allow-list unpickler:
    tensors and plain values load, any other object is refused before it is built."""
    with checkpoint.reading(folder, path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise
            raise Malformed("it holds objects other than tensors and plain values") from None


def _plain(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
