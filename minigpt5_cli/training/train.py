"""`minigpt5 train`: stage 1 (vokens + mapper on pairs) and stage 2 (plus LoRA or prefix tuning on
interleaved sequences), with accelerate, so the same code runs on one process or many. Stages llm
and generator (backbones from scratch) are in `toyworld/scratch.py`.

Checkpoints are `OUTPUT/checkpoint-STEP/` folders holding only the trained weights (vokens as
safetensors, the mapper via `save_pretrained`, the PEFT adapter folder), `recipe.yaml`, and the
optimizer and scheduler state for `--resume` (`state.py`), alike under DDP and FSDP. Ctrl-C or
SIGTERM (a cluster's preemption) saves the last finished step first; one run at a time holds
OUTPUT (the lock on `OUTPUT/.lock`), and `--resume` refuses a recipe that differs from its
checkpoint's but in RESUMABLE keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console

from minigpt5_cli import display, files
from minigpt5_cli import recipe as recipes
from minigpt5_cli.data.collate import Collator
from minigpt5_cli.data.samples import TrainSet
from minigpt5_cli.data.sources import load_sources
from minigpt5_cli.errors import UserError
from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.modeling.checkpoint import STATE_FILE, checkpoint_folder, checkpoints
from minigpt5_cli.modeling.model import MiniGPT5, build_model
from minigpt5_cli.modeling.params import table
from minigpt5_cli.toyworld import tiny
from minigpt5_cli.training import state

# Two primes that spread (seed, micro-batch) pairs over distinct per-step seeds.
SEED_STRIDE, MICRO_STRIDE = 1_000_003, 7919


def _step_seed(seed: int, batch: int) -> int:
    # Noise, timesteps, CFG drops and dropout depend on the micro-batch's index in the data order
    # alone: a resumed run replays them, and N processes draw what one process with N times the
    # gradient accumulation draws for the same batches.
    return (seed * SEED_STRIDE + batch * MICRO_STRIDE) % (2**63)


IN_USE = "{} is in use by another train run; wait for it to end, or pick another train.output_dir"
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
        from minigpt5_cli.toyworld.scratch import train_backbone

        return train_backbone(recipe, resume, console)
    # What runs; the recipe saved (and compared on --resume) stays as given, so a run resumes on a
    # machine with or without a GPU alike.
    precision = t.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        console.print("[yellow]warning:[/] fp16 needs a GPU; training in fp32 (bf16 works on CPUs)")
        precision = "no"
    if t.stage == 2 and not t.init_from:
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
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if started > accelerator.num_processes:  # e.g. a multi-GPU config on a machine without GPUs
        raise UserError(f"accelerate started {started} processes, but they did not join one process group "
                        f"({accelerator.distributed_type}): the accelerate config does not fit this machine; "
                        "on CPUs set ACCELERATE_USE_CPU=true, or launch one process")
    with ExitStack() as held:
        _lock(accelerator, out, held)
        return _run(recipe, precision, accelerator, resume, console, report)


def _lock(accelerator, out: Path, held: ExitStack) -> None:
    """The main process holds the folder's lock for the run's lifetime (`held`): a second run is refused
    before it reads or writes anything there, on every one of its processes alike, with the main one's
    error. Collective."""
    from accelerate.utils import broadcast_object_list

    error = None
    if accelerator.is_main_process:
        try:
            held.enter_context(files.run_lock(out, IN_USE.format(out)))
        except (UserError, OSError) as e:
            error = e
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise error


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
    fresh = t.stage == 1 or t.init_from == "none"
    running = dataclasses.replace(recipe, train=dataclasses.replace(t, mixed_precision=precision))
    model = build_model(running, init_from=None if fresh else checkpoint_folder(t.init_from))
    if main:
        report.print(table(model, recipe))
        if model.processor is None and t.stage == 2 and any(any(flags[:-1]) for flags in source.images):
            console.print("[yellow]warning:[/] the LLM is text-only: images in prompts are dropped")

    dataset = TrainSet(source, stage=t.stage, resolution=model.generator.resolution, history=recipe.data.history,
                       seed=t.seed, instruction_prob=recipe.data.instruction_prob,
                       images_in_prompt=model.llm_info.accepts_images, tasks=recipe.data.tasks)
    collate = Collator.for_model(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=recipe.data.num_workers)
    optimizer = make_optimizer(model, recipe)
    model.run_all_parts = accelerator.distributed_type == DistributedType.FSDP
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    per_epoch = len(loader)
    total = t.max_steps or math.ceil(t.epochs * per_epoch / t.grad_accum)
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

    trainable = raw.trainable_parameters()
    last = existing[-1] if existing and resume else None
    progress = display.progress(console, disable=not main)
    model.train()
    iterator, epoch = None, -1
    try:
        with progress:
            task = progress.add_task("train", total=total, completed=step, info="", unit="steps")
            sums: dict[str, torch.Tensor] = {}  # loss parts summed over the accumulated micro-batches
            for micro in range(step * t.grad_accum, total * t.grad_accum):
                if micro // per_epoch != epoch or iterator is None:
                    epoch = micro // per_epoch
                    loader.set_epoch(epoch)
                    skip = micro % per_epoch
                    iterator = iter(accelerator.skip_first_batches(loader, skip) if skip else loader)
                batch = next(iterator)
                # Process r of N takes batches r, r + N, ... of the shuffled order (accelerate's sharding).
                torch.manual_seed(_step_seed(t.seed, micro * accelerator.num_processes + accelerator.process_index))
                sync = (micro + 1) % t.grad_accum == 0
                with nullcontext() if sync else accelerator.no_sync(model):
                    losses = model(batch)
                    accelerator.backward(losses["loss"] / t.grad_accum)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach()
                if not sync:
                    continue
                logs = {k: accelerator.reduce(v / t.grad_accum, "mean").item() for k, v in sums.items()}
                sums = {}
                norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm > 0 else None
                _check_finite(logs, norm if precision != "fp16" else None, step + 1, last)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(task, completed=step, info=" ".join(f"{k} {v:.4f}" for k, v in logs.items()))
                if step % t.log_every == 0 or step == total:
                    accelerator.log({**logs, "lr": scheduler.get_last_lr()[0]}, step=step)
                if step % t.save_every == 0 or step == total:
                    last = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, step)
    except KeyboardInterrupt:
        # Keep what was done: the state at the last finished optimizer step. One process only, since
        # a collective save could hang when the other processes were interrupted too.
        saved = {p.name for p in checkpoints(out)}
        if accelerator.num_processes == 1 and step and f"checkpoint-{step}" not in saved:
            last = save_checkpoint(accelerator, model, optimizer, scheduler, recipe, step)
            console.print(f"interrupted: saved {last}; continue with --resume")
        raise
    accelerator.end_training()
    if main:
        report.print(f"done: {last}")
    return last


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
    if cache and tiny.resolve(cache["generator"]) != tiny.resolve(recipe.model.generator):
        raise UserError(f"the training data holds latents cached for generator {cache['generator']!r}, but the "
                        f"recipe uses {recipe.model.generator!r}; prepare the data again with --generator "
                        f"{recipe.model.generator}, or without --cache-latents")


def save_checkpoint(accelerator, model, optimizer, scheduler, recipe: recipes.Recipe, step: int) -> Path:
    """Write `checkpoint-STEP` beside a temporary name and rename, then rotate old ones out. A failed
    write (a full disk: an OSError naming the file, whatever library wrote it) leaves the earlier
    checkpoints as they were, and no partial folder."""
    out = Path(recipe.train.output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        state.save(accelerator, model, optimizer, scheduler, tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with checkpoint.writing(tmp / "recipe.yaml"):  # backbones relative to `final`, which `tmp` becomes
                recipes.save(recipes.anchored(recipe, final), tmp / "recipe.yaml")
            with checkpoint.writing(tmp / STATE_FILE):
                (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
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
