"""The training loop of every stage (1 and 2 in `train.py`, llm and generator in `scratch.py`): the
output folder held, the number of steps, optimizer steps of accumulated micro-batches (the gradients
clipped, the optimizer and its schedule stepped) with their progress, and what was done saved when
the run is interrupted (Ctrl-C, or SIGTERM under `train.sigterm_interrupts`)."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich.console import Console

from minigpt5_cli import display, files
from minigpt5_cli.errors import UserError
from minigpt5_cli.recipe import TrainConfig

IN_USE = "{} is in use by another train run; wait for it to end, or pick another train.output_dir"


@contextmanager
def locked(out: Path, accelerator=None):
    """Hold `out` for the block (its lock file), or refuse a second run before it reads or writes anything
    there. Under accelerate the main process holds it, and every process refuses alike, with the main
    one's error. Collective."""
    with ExitStack() as held:
        error = None
        if accelerator is None or accelerator.is_main_process:
            try:
                held.enter_context(files.run_lock(out, IN_USE.format(out)))
            except (UserError, OSError) as e:
                error = e
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise error
        yield


def total_steps(t: TrainConfig, n: int, per_batch: int = 1) -> int:
    """The run's optimizer steps: train.max_steps, or else enough for train.epochs passes over `n` items
    (a loader's batches, or images drawn `per_batch` at a time)."""
    return t.max_steps or math.ceil(t.epochs * n / (per_batch * t.grad_accum))


@contextmanager
def running(console: Console, interrupted: Callable[[], None], disable: bool = False):
    """The progress display of a stage's loop. When the run is interrupted, once the display has
    ended, `interrupted()` keeps what was done; then the interruption goes on."""
    try:
        with display.progress(console, disable=disable) as progress:
            yield progress
    except KeyboardInterrupt:
        interrupted()
        raise


class _Plain:
    """What the loop asks of accelerate, for one process in plain torch (the scratch stages)."""

    def no_sync(self, model):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce(self, value: torch.Tensor, reduction: str) -> torch.Tensor:
        return value

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class Loop:
    """Optimizer steps of train.grad_accum micro-batches each: each micro-batch's loss backpropagated,
    the gradients of `params` clipped to train.max_grad_norm (0: not clipped), the optimizer and its
    schedule stepped. Under accelerate (`accelerator`, `model` as prepared) the processes synchronise
    gradients at a step's last micro-batch only, and the losses shown are their mean over processes.
    `check(step, losses, gradient norm)`, before the optimizer steps, may stop the run."""

    def __init__(self, optimizer, scheduler, params, t: TrainConfig, accelerator=None, model=None,
                 check: Callable[[int, dict[str, float], torch.Tensor | None], None] | None = None):
        self.optimizer, self.scheduler, self.params = optimizer, scheduler, list(params)
        self.accum, self.max_norm = t.grad_accum, t.max_grad_norm
        self.accelerator, self.model, self.check = accelerator or _Plain(), model, check

    def steps(self, progress, name: str, total: int, micro: Callable[[int], dict[str, torch.Tensor]],
              start: int = 0) -> Iterator[tuple[int, dict[str, float]]]:
        """Steps `start` + 1 to `total`, shown as task `name` of `progress`: right after each, (its number,
        each loss's mean over its micro-batches), so that an interruption finds the steps done counted.
        `micro(i)`: the losses of micro-batch i (counted from the run's first), the first of which is
        trained on."""
        task = progress.add_task(name, total=total, completed=start, info="", unit="steps")
        for step in range(start + 1, total + 1):
            losses = self._step(micro, (step - 1) * self.accum, step)
            yield step, losses
            progress.update(task, completed=step, info=" ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    def _step(self, micro, first: int, step: int) -> dict[str, float]:
        acc, sums = self.accelerator, {}
        for i in range(first, first + self.accum):
            with nullcontext() if i + 1 == first + self.accum else acc.no_sync(self.model):
                losses = micro(i)
                acc.backward(next(iter(losses.values())) / self.accum)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
        means = {k: acc.reduce(v / self.accum, "mean").item() for k, v in sums.items()}
        norm = acc.clip_grad_norm_(self.params, self.max_norm) if self.max_norm > 0 else None
        if self.check:
            self.check(step, means, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return means
