"""`minigpt5 train`: stage 1 (vokens + mapper on pairs) and stage 2 (plus LoRA or prefix tuning on
interleaved sequences), with accelerate, so the same code runs on one process or many. Stages llm
and generator (backbones from scratch) are in `scratch.py`; all four run the loop of `loop.py`.

Checkpoints are `OUTPUT/checkpoint-STEP/` folders holding only the trained weights (vokens as
safetensors, the mapper via `save_pretrained`, the PEFT adapter folder), `recipe.yaml`, and the
optimizer and scheduler state for `--resume` (`state.py`), alike under DDP and FSDP. Ctrl-C or
SIGTERM (a cluster's preemption) saves the last finished step first; one run at a time holds
OUTPUT (the lock on `OUTPUT/.lock`), and `--resume` refuses a recipe that differs from its
checkpoint's but in RESUMABLE keys.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console

from minigpt5_cli import files, hub, processes
from minigpt5_cli import recipe as recipes
from minigpt5_cli.data.batching import GroupedSampler, lengths
from minigpt5_cli.data.collate import Collator
from minigpt5_cli.data.samples import TrainSet
from minigpt5_cli.data.sources import load_sources
from minigpt5_cli.errors import UserError
from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.modeling.checkpoint import STEP_FILE, checkpoint_folder, checkpoints
from minigpt5_cli.modeling.model import MiniGPT5, build_model, run_precision
from minigpt5_cli.modeling.params import table
from minigpt5_cli.seeds import micro_seed
from minigpt5_cli.training import state
from minigpt5_cli.training.loop import Loop, locked, running, total_steps
from minigpt5_cli.training.scratch import train_backbone

# What a resumed run may change: how it saves, logs, loads data and samples afterwards; not what it computes.
RESUMABLE = ("train.output_dir", "train.save_every", "train.keep_checkpoints", "train.log_every", "train.tracker",
             "data.num_workers", "sample.")
# What to do instead, where the general advice does not say why.
INSTEAD = dict.fromkeys(("train.max_steps", "train.epochs"), "the learning rate's schedule, restored with the run, "
                        "spans its steps as they were set; to train for more or fewer steps, start a new "
                        "train.output_dir")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster preempting the job, `kill`) during training: it stops as Ctrl-C stops it,
    saving the last finished step."""


@contextmanager
def sigterm_interrupts():
    """For the block, SIGTERM raises Terminated as Ctrl-C raises KeyboardInterrupt; a repeat while that
    is handled (a launcher passing the signal on) is ignored, so the save runs to its end. The previous
    handler is back afterwards. Python handles signals in the main thread only: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def train(recipe: recipes.Recipe, resume: bool = False, console: Console | None = None) -> Path:
    """Train one stage; return the last checkpoint folder."""
    with sigterm_interrupts():
        return _train(recipe, resume, console)


def _train(recipe: recipes.Recipe, resume: bool, console: Console | None) -> Path:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    console = console or Console(stderr=True)  # warnings and progress; the report goes to stdout
    report = Console()
    t = recipe.train
    files.writable_folder(Path(t.output_dir), "train.output_dir")
    recipes.check_found(recipe, (t.stage,) if t.stage in ("llm", "generator") else recipes.BACKBONES)
    if t.stage in ("llm", "generator"):
        return train_backbone(recipe, resume, console)
    # What runs; the recipe saved (and compared on --resume) stays as given, so a run resumes on a
    # machine with or without a GPU alike.
    precision = run_precision(t.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu", console)
    if t.stage == "2" and not t.init_from:
        raise UserError("stage 2 starts from a stage-1 checkpoint: set train.init_from (or none, to start "
                        "the vokens and the mapper fresh)")
    if not recipe.data.train:
        raise UserError("no training data: set data.train")
    out = Path(t.output_dir)
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with=None if t.tracker == "none" else t.tracker,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        # Stage-2 batches may hold no image, leaving the mapper unused for a step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Its engine would own gradient accumulation, clipping and the optimizer state this loop and
        # its checkpoints hold; not supported yet.
        raise UserError("DeepSpeed is not supported: shard with FSDP instead (accelerate launch --config_file "
                        "recipes/accelerate/fsdp.yaml)")
    processes.check_joined(accelerator.num_processes, accelerator.distributed_type)
    with locked(out, accelerator):
        return _run(recipe, precision, accelerator, resume, console, report)


def _run(recipe: recipes.Recipe, precision: str, accelerator, resume: bool, console: Console,
         report: Console) -> Path:
    """Train as `recipe` says (saved with each checkpoint), in `precision` (the recipe's, but fp32 for
    fp16 without a GPU)."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_linear_schedule_with_warmup

    t, out = recipe.train, Path(recipe.train.output_dir)
    existing = checkpoints(out)
    if existing and not resume:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue, or pick another output_dir")
    if existing and resume:
        _check_resumed(recipe, existing[-1])
    main = accelerator.is_main_process
    set_seed(t.seed)
    source = load_sources([recipe.data.train, *recipe.data.extra], t.stage, recipe.data.allow_outside_paths)
    _check_cache(source, recipe)
    fresh = t.stage == "1" or t.init_from == "none"
    model = model_for(recipe, init_from=None if fresh else checkpoint_folder(t.init_from), precision=precision)
    if main:
        report.print(table(model, recipe))
        if model.processor is None and t.stage == "2" and any(any(flags[:-1]) for flags in source.images):
            console.print("[yellow]warning:[/] the LLM is text-only: images in prompts are dropped")

    dataset = TrainSet(source, stage=t.stage, resolution=model.generator.resolution, history=recipe.data.history,
                       seed=t.seed, instruction_prob=recipe.data.instruction_prob,
                       images_in_prompt=model.llm_info.accepts_images, tasks=recipe.data.tasks)
    collate = Collator.for_model(model, recipe.data)
    # Grouped by length, or shuffled by accelerate's seedable sampler; either order follows from the epoch.
    sampler = GroupedSampler(lengths(dataset, collate), t, accelerator.num_processes) if recipe.data.group_by_length \
        else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=sampler is None, sampler=sampler,
                                         collate_fn=collate, num_workers=recipe.data.num_workers)
    optimizer = make_optimizer(model, recipe)
    model.run_all_parts = accelerator.distributed_type == DistributedType.FSDP
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total = total_steps(t, len(loader))
    # Stepped once per optimizer step on every process, so it is not handed to accelerate.
    scheduler = get_linear_schedule_with_warmup(optimizer, min(t.warmup_steps, total), total)
    raw: MiniGPT5 = accelerator.unwrap_model(model)

    step = 0
    if resume and existing:
        step = state.load(accelerator, model, optimizer, scheduler, existing[-1])
        if main:
            report.print(f"resumed from {existing[-1]} at step {step}")
    elif resume and main:
        report.print(f"no checkpoint in {out}; starting fresh")
    if main and not (resume and existing):  # a resumed run keeps the recipe it started with
        out.mkdir(parents=True, exist_ok=True)
        recipes.save(recipes.anchored(recipe, out), out / "recipe.yaml")
    accelerator.init_trackers("minigpt5", config=_flat(recipes.to_dict(recipe)))

    last = existing[-1] if existing and resume else None
    loop = Loop(optimizer, scheduler, raw.trainable_parameters(), t, accelerator, model,
                check=lambda n, logs, norm: _check_finite(logs, norm if precision != "fp16" else None, n, last))
    batches = _batches(accelerator, loader, step * t.grad_accum)

    def micro(i: int) -> dict[str, torch.Tensor]:
        batch = next(batches)
        # Process r of N takes batches r, r + N, ... of the shuffled order (accelerate's sharding).
        torch.manual_seed(micro_seed(t.seed, i * accelerator.num_processes + accelerator.process_index))
        return model(batch)

    def interrupted() -> None:
        # Keep what was done: the state at the last finished optimizer step. One process only, since
        # a collective save could hang when the other processes were interrupted too.
        if accelerator.num_processes == 1 and step and f"checkpoint-{step}" not in {p.name for p in checkpoints(out)}:
            saved = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, step)
            console.print(f"interrupted: saved {saved}; continue with --resume")

    model.train()
    with running(console, interrupted, disable=not main) as progress:
        for step, logs in loop.steps(progress, "train", total, micro, start=step):
            if step % t.log_every == 0 or step == total:
                accelerator.log({**logs, "lr": scheduler.get_last_lr()[0]}, step=step)
            if step % t.save_every == 0 or step == total:
                last = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, step)
    accelerator.end_training()
    if main:
        report.print(f"done: {last}")
    return last


def _batches(accelerator, loader, start: int) -> Iterator:
    """The prepared loader's batches from micro-batch `start` on, epoch after epoch: the data order
    follows from the micro-batch's index alone (each epoch's shuffle, grouped by length or not, seeded
    by its number), so a resumed run takes the batches an uninterrupted one takes."""
    per_epoch = len(loader)
    for micro in itertools.count(start):
        epoch, skip = divmod(micro, per_epoch)
        if micro == start or not skip:
            loader.set_epoch(epoch)
            iterator = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
        yield next(iterator)


def _check_resumed(recipe: recipes.Recipe, folder: Path) -> None:
    """Refuse a resumed run whose recipe differs from the one its checkpoint was trained with, but for
    the RESUMABLE keys: the restored optimizer and scheduler would keep the old values anyway (a new
    learning rate), or the run would change halfway (data, model), while its checkpoints claimed otherwise."""
    from minigpt5_cli.modeling.bundle import located

    path = folder / "recipe.yaml"
    try:  # backbones compared where they lie: the checkpoint names them relative to itself
        saved = _leaves(recipes.to_dict(located(folder, recipes.load(path))))
    except UserError as e:  # e.g. a key an earlier version had; most messages name the file already
        raise UserError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    for key, value in _leaves(recipes.to_dict(located(folder, recipes.anchored(recipe, folder)))).items():
        if not key.startswith(RESUMABLE) and saved[key] != value:
            instead = INSTEAD.get(key, "start a new train.output_dir to change it")
            raise UserError(f"--resume continues the run as saved in {path}: {key} is {recipes._show(value)} here, "
                            f"{recipes._show(saved[key])} there; {instead}")


def _leaves(tree: dict, prefix: str = "") -> dict:
    leaves = {}
    for key, value in tree.items():
        leaves.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return leaves


def model_for(recipe: recipes.Recipe, init_from: str | Path | None = None, precision: str | None = None,
              checkpointing: bool | None = None, empty: bool = False) -> MiniGPT5:
    """The model as training builds it from `recipe`: in its precision, checkpointing activations as it
    says, unless `precision` or `checkpointing` say otherwise. `empty`: no weights read (`train --plan`)."""
    t = recipe.train
    return build_model(recipe.model, recipe.adapter, loss=recipe.loss, precision=precision or t.mixed_precision,
                       checkpointing=t.gradient_checkpointing if checkpointing is None else checkpointing,
                       freeze_mapper_input=t.freeze_mapper_input, init_from=init_from, empty=empty)


def make_optimizer(model: MiniGPT5, recipe: recipes.Recipe) -> torch.optim.AdamW:
    """AdamW over the trained tensors, the mapper at its own learning rate. Fused: one kernel for all
    tensors (on CPU about 4x faster than the per-tensor loop for the paper's 127M)."""
    groups, t = model.trainable_groups(), recipe.train
    return torch.optim.AdamW(
        [g for g in ({"params": groups["vokens"] + groups["adapter"], "lr": t.lr},
                     {"params": groups["mapper"], "lr": t.lr * t.mapper_lr_scale}) if g["params"]],
        lr=t.lr, eps=t.adam_eps, weight_decay=t.weight_decay, fused=True,
    )


def _check_finite(logs: dict[str, float], grad_norm, step: int, last: Path | None) -> None:
    """Stop, before the optimizer step, when a loss or the gradient norm is not finite: every later
    step would train on NaN weights. (fp16's scaler skips steps with inf gradients by itself, so its
    gradient norm is not checked.) The same on every process: the values are reduced across them."""
    bad = [f"{k} {v}" for k, v in logs.items() if not math.isfinite(v)]
    if grad_norm is not None and not torch.isfinite(grad_norm):
        bad.append(f"gradient norm {grad_norm.item()}")
    if bad:
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise UserError(f"training diverged at step {step} ({', '.join(bad)}); nothing of this step was kept, "
                        f"{kept}; lower train.lr or check the data")


def _check_cache(source, recipe: recipes.Recipe) -> None:
    """Cached latents are only valid for the generator that made them."""
    cache = source.cache
    if cache and hub.resolve(cache["generator"]) != hub.resolve(recipe.model.generator):
        raise UserError(f"the training data holds latents cached for generator {cache['generator']!r}, but the "
                        f"recipe uses {recipe.model.generator!r}; prepare the data again with --generator "
                        f"{recipe.model.generator}, or without --cache-latents")


def save_checkpoint(accelerator, model, optimizer, scheduler, recipe: recipes.Recipe, step: int) -> Path:
    """Write `checkpoint-STEP` (`files.staged`, into a temporary name every process knows), then rotate
    old ones out. A failed write (a full disk: an OSError naming the file, whatever library wrote it)
    leaves the earlier checkpoints as they were, and no partial folder."""
    out, main = Path(recipe.train.output_dir), accelerator.is_main_process
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    with files.staged(final, replace=True, tmp=tmp) if main else nullcontext():
        accelerator.wait_for_everyone()
        state.save(accelerator, model, optimizer, scheduler, tmp)
        accelerator.wait_for_everyone()
        if main:
            with checkpoint.writing(tmp / "recipe.yaml"):  # backbones relative to `final`, which `tmp` becomes
                recipes.save(recipes.anchored(recipe, final), tmp / "recipe.yaml")
            with checkpoint.writing(tmp / STEP_FILE):
                (tmp / STEP_FILE).write_text(json.dumps({"step": step}))
    if main:
        for old in checkpoints(out)[:-recipe.train.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
