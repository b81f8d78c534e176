"""`minigpt5 train --plan`: the memory one GPU needs for a recipe, before any weights are fetched.

The model is built through `build_model` from the backbones' configs, its parameters on the meta
device and then fake tensors (shapes and dtypes, no storage), and real training steps run on it:
the collator's batch at the recipe's longest samples, forward, backward, gradient clipping and
AdamW's step. A dispatch mode counts the bytes alive after every op, so activations, temporaries and gradients are
those the step allocates, measured rather than guessed; weights and optimizer state are counted
from the built model. Token ids and masks stay real inside the fake mode, so the ops that read
them (finding image tokens, vokens) run as in training.

What is derived rather than measured: the DDP and FSDP layouts (DDP keeps everything on every
device plus a gradient bucket per trainable tensor; FSDP shards parameters, gradients and optimizer
state N ways, gathers the two largest wrapped layers at a time and keeps the parts outside wrapped
layers whole during the step), and a fixed reserve for the CUDA context and allocator slack.
`measured_growth` checks the estimate against a real step on this machine.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt5_cli import recipe as recipes
from minigpt5_cli.errors import UserError

GiB = 2**30
RESERVE = GiB  # the CUDA context and allocator slack: a typical figure, not measured here
CONSTANT_LIMIT = 2**22  # integer tensors up to this size stay real in the fake mode
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int | None:
    """Bytes from a size such as 24GiB, 80GB or 40 (GiB); None for an empty text."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    unit = match and (match.group(2) or "gib")
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r} is not a size: write, for example, 24GiB or 80GB")
    return int(float(match.group(1)) * UNITS[unit])


# -- counting bytes


class Bytes(TorchDispatchMode):
    """Counts the bytes of tensor storages allocated inside it while they are alive; keeps the peak.
    An op's output that shares storage with one of its inputs (a view, an in-place op) allocates
    nothing: so views of weights or of tensors made before are not counted."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        given = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._live and key not in given:
                    self._live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Fake(FakeTensorMode):
        def may_turn_const(self, t):  # scalars (optimizer steps) and integer tensors (ids, masks) keep values
            small = t.numel() <= 1 or (not t.is_floating_point() and not t.is_complex() and t.numel() <= CONSTANT_LIMIT)
            return small and not self.is_our_fake(t) and t.device.type != "meta" and t.layout == torch.strided

    return Fake(allow_non_fake_inputs=True)


# -- the step


def plan_batch(model, recipe: recipes.Recipe, size: int) -> dict:
    """A batch of `size` samples as the collator writes them for this recipe at its longest: stage 1
    a prompt of data.max_length tokens; stage 2 data.history steps of text and image whose text alone
    fills data.max_length (the collator drops the oldest steps that do not fit, as in training)."""
    from PIL import Image

    from minigpt5_cli.data import prompts
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.samples import Sample

    collate = Collator.for_model(model, recipe.data)
    length = recipe.data.max_length
    res = model.generator.resolution
    pixels = torch.zeros(3, res, res)
    words = lambda n: " ".join(["story"] * max(1, n))  # noqa: E731
    if recipe.train.stage == "1":
        samples = [Sample(prompt=words(length), vokens=True, caption=words(20), image=pixels) for _ in range(size)]
    else:
        steps = max(1, recipe.data.history)
        picture = Image.new("RGB", (res, res), (128, 128, 128)) if model.llm_info.accepts_images else None
        history = [(words(length // (steps + 1)), picture) for _ in range(steps)] + [(prompts.NEXT, None)]
        samples = [Sample(history=list(history), target=words(16), vokens=True, image=pixels) for _ in range(size)]
    return collate(samples)


@dataclass
class Step:
    """Bytes one step needs beyond what is held between steps, measured."""

    tokens: int  # per sample
    image_tokens: int  # of those, the prompt images' placeholders
    forward_backward: int  # peak growth in forward and backward: activations, temporaries, gradients
    optimizer: int  # peak growth in clipping and the optimizer step (temporaries)


@dataclass
class Plan:
    recipe: recipes.Recipe
    processes: int
    batch_size: int
    weights: dict[str, int]  # frozen weights and buffers by dtype, "trainable" for the trained ones
    gradients: int
    optimizer_state: int
    units: list[int]  # bytes of each layer FSDP wraps, as gathered for compute
    steps: dict[tuple[int, bool], Step]  # (micro-batch, checkpointing) -> measured step
    names: tuple[str, str]

    @property
    def frozen(self) -> int:
        return sum(v for k, v in self.weights.items() if k != "trainable")

    def activations(self, size: int, checkpointing: bool) -> int:
        """Peak growth of a step at micro-batch `size`: measured where it was, else on the line
        through the measured sizes 1 and 2 (activations grow linearly with the batch)."""
        one, two = self.steps[(1, checkpointing)], self.steps[(2, checkpointing)]
        if (size, checkpointing) in self.steps:
            s = self.steps[(size, checkpointing)]
        else:
            slope = two.forward_backward - one.forward_backward
            s = Step(one.tokens, one.image_tokens, one.forward_backward + (size - 1) * slope, one.optimizer)
        return max(s.forward_backward, self.gradients + s.optimizer)

    def layout(self, fsdp: bool) -> dict[str, int]:
        """Bytes per device, by part, for DDP or FSDP over `processes` devices (no activations)."""
        n = self.processes
        trainable = self.weights["trainable"]
        if not fsdp:
            buckets = self.gradients if n > 1 else 0  # DDP reduces through a copy of the gradients
            return {"frozen": self.frozen, "trainable": trainable, "gradients": self.gradients + buckets,
                    "optimizer": self.optimizer_state}
        # Beside each device's shards, gathered copies: the parts outside wrapped layers for the whole
        # step, and the wrapped layer computing with the one prefetched.
        whole = self.frozen + trainable - sum(self.units)
        gathered = whole + sum(sorted(self.units)[-2:]) if n > 1 else 0
        shard = lambda v: math.ceil(v / n)  # noqa: E731
        return {"frozen": shard(self.frozen) + gathered,
                "trainable": shard(trainable), "gradients": shard(self.gradients),
                "optimizer": shard(self.optimizer_state)}

    def total(self, size: int, checkpointing: bool, fsdp: bool) -> int:
        return sum(self.layout(fsdp).values()) + self.activations(size, checkpointing) + RESERVE

    def largest(self, memory: int, checkpointing: bool, fsdp: bool, limit: int = 4096) -> int:
        """The largest micro-batch whose total fits in `memory`; 0 if none does."""
        best = 0
        while best < limit and self.total(best + 1, checkpointing, fsdp) <= memory:
            best += 1
        return best


def _storage_bytes(tensors) -> dict[int, tuple[torch.Tensor, int]]:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen.setdefault(st._cdata, (t, st.nbytes()))
    return seen


def _fakify(model, mode) -> None:
    """Every meta parameter and buffer of `model` in place as a fake CPU tensor (tied ones stay tied)."""
    from torch import nn

    cpu = torch.device("cpu")
    convert = mode.fake_tensor_converter
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    fake = convert.from_meta_and_device(mode, t, cpu)
                    done[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if is_param else fake
                table[name] = done[id(t)]


def _weights(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, nbytes in _storage_bytes([*model.parameters(), *model.buffers()]).values():
        key = "trainable" if t.requires_grad else str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + nbytes
    out.setdefault("trainable", 0)
    return out


def _units(model, compute_dtype: torch.dtype) -> list[int]:
    """Bytes of each layer FSDP wraps (model._no_split_modules), gathered in the compute dtype: a
    parameter belongs to its innermost wrapped ancestor."""
    names = set(model._no_split_modules)
    owner: dict[int, int] = {}
    units: list[int] = []
    for module in model.modules():  # parents before children: the innermost unit is set last
        if type(module).__name__ in names:
            units.append(0)
            for p in module.parameters():
                owner[id(p)] = len(units) - 1
    size = compute_dtype.itemsize if compute_dtype != torch.float32 else None
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in owner:
            units[owner[id(p)]] += p.numel() * (size or p.element_size())
    return [u for u in units if u]


def _measured_step(model, optimizer, trainable, batch: dict, autocast, mode) -> Step:
    fake = {k: mode.fake_tensor_converter.from_real_tensor(mode, v, make_constant=not v.is_floating_point())
            if torch.is_tensor(v) else v for k, v in batch.items()}
    with mode:
        forward_backward = Bytes()
        with forward_backward:
            with autocast():
                loss = model(fake)["loss"]
            loss.backward()
            del loss
        step = Bytes()
        with step:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    image = getattr(model.processor, "image_token_id", None)
    images = int((batch["input_ids"][0] == image).sum()) if image is not None else 0
    return Step(batch["input_ids"].shape[1], images, forward_backward.peak, step.peak)


def forward_autocast(recipe: recipes.Recipe, device: str = "cpu"):
    """What accelerate wraps the forward pass in for the recipe's mixed precision."""
    from minigpt5_cli.modeling.model import DTYPES

    dtype = DTYPES[recipe.train.mixed_precision]
    return (lambda: torch.autocast(device, dtype=dtype)) if dtype != torch.float32 else nullcontext


def measure(recipe: recipes.Recipe, processes: int = 1) -> Plan:
    """Build the recipe's model without weights and measure its steps at micro-batches 1, 2 and the
    recipe's, with and without gradient checkpointing."""
    from accelerate import init_empty_weights

    from minigpt5_cli.hub import quiet, resolve
    from minigpt5_cli.modeling.model import DTYPES
    from minigpt5_cli.training.train import make_optimizer, model_for

    if recipe.train.stage not in ("1", "2"):
        raise UserError(f"--plan covers stages 1 and 2; stage {recipe.train.stage} trains a small backbone from scratch")
    if processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {processes}")
    quiet(errors_only=True)
    for name in (recipe.model.llm, recipe.model.generator):
        resolve(name, shapes_only=True)  # built here, with real weights to save, when not cached yet
    with init_empty_weights(), torch.random.fork_rng():  # parameters on the meta device, the rest real
        model = model_for(recipe, checkpointing=False, empty=True)
    mode = _fake_mode()
    _fakify(model, mode)
    model.train()
    with mode:
        optimizer = make_optimizer(model, recipe)
    trainable = model.trainable_parameters()
    autocast = forward_autocast(recipe)
    weights = _weights(model)
    units = _units(model, DTYPES[recipe.train.mixed_precision])
    size = recipe.train.batch_size
    batches = {b: plan_batch(model, recipe, b) for b in sorted({1, 2, size})}
    _measured_step(model, optimizer, trainable, batches[1], autocast, mode)  # warm-up: optimizer state, cached nulls
    steps = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.checkpoint_activations()
        for b, batch in batches.items():
            steps[(b, checkpointing)] = _measured_step(model, optimizer, trainable, batch, autocast, mode)
    state = sum(n for _, n in _storage_bytes(
        [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]).values())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return Plan(recipe=recipe, processes=processes, batch_size=size, weights=weights, gradients=grads,
                optimizer_state=state, units=units, steps=steps, names=(recipe.model.llm, recipe.model.generator))


# -- the table


def render(plan: Plan, memory: int | None = None):
    """The plan as a table per device, DDP and FSDP side by side, with and without checkpointing."""
    from rich.console import Group
    from rich.table import Table

    unit, size = ("GiB", GiB) if plan.frozen >= GiB else ("MiB", 2**20)  # tiny backbones: MiB

    def fmt(n: int) -> str:
        return f"{n / size:.2f}"

    r, n, b = plan.recipe, plan.processes, plan.batch_size
    step = plan.steps[(b, False)]
    images = f", {step.image_tokens} of them image tokens" if plan.recipe.train.stage == "2" else ""
    title = (f"Memory per GPU ({unit}): {plan.names[0]} + {plan.names[1]}, stage {r.train.stage}"
             f"{'' if r.adapter.kind == 'none' else ' ' + r.adapter.kind}, {r.train.mixed_precision}, "
             f"{n} process{'es' if n > 1 else ''}, micro-batch {b} x {step.tokens} tokens{images} "
             f"(data.max_length {r.data.max_length})")
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column(f"DDP x{n}", justify="right")
    table.add_column(f"FSDP x{n}", justify="right")
    ddp, fsdp = plan.layout(False), plan.layout(True)
    dtypes = ", ".join(f"{k} {fmt(v)}" for k, v in plan.weights.items() if k != "trainable" and v >= plan.frozen / 100)
    table.add_row(f"frozen weights ({dtypes})", fmt(ddp["frozen"]), fmt(fsdp["frozen"]))
    table.add_row("trainable weights", fmt(ddp["trainable"]), fmt(fsdp["trainable"]))
    table.add_row("gradients" + (" (DDP: and its buckets)" if n > 1 else ""), fmt(ddp["gradients"]),
                  fmt(fsdp["gradients"]))
    table.add_row("optimizer state (AdamW)", fmt(ddp["optimizer"]), fmt(fsdp["optimizer"]))
    for ckpt in (False, True):
        act = fmt(plan.activations(b, ckpt))
        table.add_row(f"activations and temporaries{', checkpointed' if ckpt else ''} (measured)", act, act)
    table.add_row("CUDA context and allocator slack (assumed)", fmt(RESERVE), fmt(RESERVE))
    for ckpt in (False, True):
        label = "total" + (", gradient checkpointing" if ckpt else "")
        table.add_row(f"[bold]{label}[/]", *(f"[bold]{fmt(plan.total(b, ckpt, f))}[/]" for f in (False, True)))
    lines = [table]
    if memory:
        verdicts = Table(title=f"In {memory / GiB:.1f} GiB per GPU", title_justify="left")
        verdicts.add_column("layout")
        verdicts.add_column(f"micro-batch {b}")
        verdicts.add_column("largest micro-batch", justify="right")
        for fsdp_ in (False, True):
            for ckpt in (False, True):
                name = ("FSDP" if fsdp_ else "DDP") + (" + checkpointing" if ckpt else "")
                fits = plan.total(b, ckpt, fsdp_) <= memory
                verdicts.add_row(name, "[green]fits[/]" if fits else "[red]does not fit[/]",
                                 str(plan.largest(memory, ckpt, fsdp_) or "none"))
        lines.append(verdicts)
    return Group(*lines)


# -- the check against a real step


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measured_growth(recipe: recipes.Recipe, size: int) -> int:
    """Peak memory growth of one real training step at micro-batch `size` over what is held between
    steps, on this machine (GPU: peak allocated; CPU: peak resident set, reset through
    /proc/self/clear_refs). Run it in a fresh process with MALLOC_MMAP_THRESHOLD_ set low, so freed
    tensors leave the resident set at once."""
    from minigpt5_cli.training.train import make_optimizer, model_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = model_for(recipe).to(device)
    model.train()
    optimizer = make_optimizer(model, recipe)
    trainable = model.trainable_parameters()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in plan_batch(model, recipe, size).items()}
    autocast = forward_autocast(recipe, device)

    def step():
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, cached nulls
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set to the current one
    before = _rss("VmRSS")
    step()
    return _rss("VmHWM") - before


def child_environment() -> dict[str, str]:
    """The environment for `measured_growth`'s process: large blocks mapped and unmapped directly."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
