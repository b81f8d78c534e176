"""Training state in a checkpoint folder, the same under one process, DDP and FSDP: the trained
weights (`modeling/checkpoint.py`'s files), the optimizer state keyed by parameter name (torch's
distributed-checkpoint state dicts, gathered whole), the scheduler, the fp16 loss scaler.

Frozen backbones are never written, under FSDP neither (accelerate's FSDP checkpoint would write
every shard of them). No RNG state is kept: every micro-batch reseeds from (seed, its index), and
the data order follows from the step, so a resumed run replays the same steps.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from minigpt5_cli.modeling import checkpoint

OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE = "optimizer.bin", "scheduler.bin", "scaler.bin"


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
        torch.save(optim, folder / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), folder / SCALER_FILE)


def load(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """Read what `save` wrote back into a prepared model, its optimizer and scheduler."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    raw = accelerator.unwrap_model(model)
    # Whole tensors in, each process keeps its shards (a plain copy without FSDP).
    set_model_state_dict(model, checkpoint.read(raw, folder), options=StateDictOptions(full_state_dict=True,
                                                                                          strict=False))
    try:
        optim = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
        if all(isinstance(k, int) for k in optim.get("state", {})):  # written by 0.x, keyed by position
            _plain(optimizer).load_state_dict(optim)
        else:
            set_optimizer_state_dict(model, _plain(optimizer), optim, options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=False))
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(torch.load(folder / SCALER_FILE, weights_only=False))
    except checkpoint.DAMAGED as e:
        raise checkpoint.damaged(folder, e) from None


def _plain(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
