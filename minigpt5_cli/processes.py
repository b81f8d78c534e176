"""The processes of a run started with `accelerate launch`: which one this is, and the few collectives
that the stages spreading their work over them need. A plain run is one process: every function here
then works alone, without torch.distributed.

Every collective is called by every process, in the same order. A refusal (UserError) met by one
process reaches all of them through the collective that follows, so each stops with it and none
waits for the others; the main one prints it (`alike`)."""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from minigpt5_cli.errors import UserError


@dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1
    device: str | None = None  # this process's device, under a launch

    @property
    def main(self) -> bool:
        return self.index == 0


def launched() -> int:
    """How many processes the launcher started (1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_joined(joined: int, kind) -> None:
    """Refuse a launch whose processes did not join one group of `joined` (`kind`, accelerate's distributed
    type): e.g. a multi-GPU config on a machine without GPUs, which would run separate copies."""
    started = launched()
    if started > joined:
        raise UserError(f"accelerate started {started} processes, but they did not join one process group "
                        f"({kind}): the accelerate config does not fit this machine; "
                        "on CPUs set ACCELERATE_USE_CPU=true, or launch one process")


def join(timeout: timedelta | None = None) -> Processes:
    """This process's place in a launched run, its process group joined (each process on its own GPU, or
    on the CPU under ACCELERATE_USE_CPU); a plain run is one process. `timeout`: how long a collective
    waits for the others (accelerate's default otherwise)."""
    if launched() == 1:
        return Processes()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(parse_flag_from_env("ACCELERATE_USE_CPU"), **({"timeout": timeout} if timeout else {}))
    atexit.register(_leave)
    check_joined(state.num_processes, state.distributed_type)
    return Processes(state.process_index, state.num_processes, str(state.device))


WAIT = 600


def _leave() -> None:
    """Leave the process group before the interpreter tears down: a process done before the others (their
    main one still writing) would otherwise abort on the group's threads at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def alike():
    """A block whose refusals every process of a launch meets alike: on the same input, or through a
    collective. The main process raises it (its one line); the others wait, silent, for the launcher to
    stop them once the main one has ended, so that its line is never cut short (a slow main process,
    still loading a model, has WAIT seconds to get there)."""
    try:
        yield
    except (UserError, OSError):  # OSError: a full disk the main process met and handed on
        if os.environ.get("RANK", "0") == "0":
            raise
        time.sleep(WAIT)
        raise SystemExit(2) from None


def _place() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(value, error: Exception | None = None) -> list:
    """Every process's `value`, in process order, on every process; when a process passes an error
    instead (a refusal, a full disk), every process raises the first one."""
    _, count = _place()
    if count == 1:
        if error is not None:
            raise error
        return [value]
    import torch.distributed as dist

    parts = [None] * count
    dist.all_gather_object(parts, (value, error))
    for _, e in parts:
        if e is not None:
            raise e
    return [v for v, _ in parts]


def broadcast(value, error: Exception | None = None):
    """The main process's `value` on every process, or its error raised on every process."""
    _, count = _place()
    if count > 1:
        import torch.distributed as dist

        box = [(value, error)]
        dist.broadcast_object_list(box, src=0)
        value, error = box[0]
    if error is not None:
        raise error
    return value


def spread(items: list, batch_size: int, fn: Callable[[list], Iterable]) -> list:
    """`fn` over `items` in batches of `batch_size`, the batches dealt out to the processes in turn, and
    every result on every process, in order. The batches are those one process would run, so the
    results are too."""
    index, count = _place()
    out = []
    for start in range(0, len(items), batch_size * count):
        mine = items[start + index * batch_size:start + (index + 1) * batch_size]
        if count == 1:
            out.extend(fn(mine))
            continue
        try:
            part, error = list(fn(mine)) if mine else [], None
        except UserError as e:
            part, error = [], e
        out.extend(x for p in gather(part, error) for x in p)
    return out


class Handoff:
    """The main process leads the block and gives the others their work once, with `give`; a block that
    ends without giving it gives them nothing (None), or its refusal (UserError, or OSError: a full
    disk), which they raise too. The others wait for it with `take`."""

    def __init__(self):
        self.given = False

    def give(self, work) -> None:
        self.given = True
        broadcast(work)

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.given or (kind is not None and not issubclass(kind, Exception)):
            return  # an interruption reaches every process itself
        self.given = True
        if _place()[1] > 1:
            import torch.distributed as dist

            dist.broadcast_object_list([(None, error if isinstance(error, (UserError, OSError)) else None)], src=0)

    @staticmethod
    def take():
        return broadcast(None)
