"""FSDP through accelerate with recipes/accelerate/fsdp.yaml: two CPU processes over gloo shard the
model with torch's FSDP2 (frozen backbones, voken rows, mapper, LoRA or prefix) and train to the
weights one process reaches on the same batches; a run resumes from a checkpoint they wrote.

accelerate itself sends CPU processes to DDP only; `fsdp_on_cpu/sitecustomize.py` turns its FSDP
branch on for them (see there). Each process reports how many parameters came out sharded.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt5_cli.modeling.checkpoint import checkpoints

from conftest import REPO, run_cli
from test_train import stage2_args, weights

SHIM = Path(__file__).parent / "fsdp_on_cpu"
COMMON = ("train.mixed_precision=no", "train.batch_size=1", "train.max_steps=4", "train.save_every=2",
          "train.warmup_steps=1", "adapter.dropout=0.3")


def launch(out: Path, kind: str, *extra: str) -> list[dict]:
    report = out.parent / f"{out.name}-report"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "FSDP_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join([str(SHIM), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/fsdp.yaml"),
           "--num_processes", "2", "-m", "minigpt5_cli", *stage2_args(out, "none", kind, *COMMON, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]


def close(a: dict, b: dict, earlier: dict) -> None:
    """`a` and `b` differ by under 1% of how far `a` moved since `earlier` (Adam divides each gradient
    by its own size, so float noise in a tiny gradient moves a weight by up to the learning rate)."""
    assert a.keys() == b.keys() == earlier.keys() and len(a) > 3
    for k in a:
        assert (a[k] - b[k]).norm() <= 0.01 * (a[k] - earlier[k]).norm() + 1e-7, k


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_fsdp_on_two_processes_trains_what_one_process_trains(tmp_path, kind):
    # Two processes, 2 micro-batches each per step == one process, 4 micro-batches per step.
    assert run_cli(*stage2_args(tmp_path / "single", "none", kind, *COMMON, "train.grad_accum=4")) == 0
    reports = launch(tmp_path / "fsdp", kind, "train.grad_accum=2")
    assert all(r["type"] == "DistributedType.FSDP" and r["sharded"] == r["params"] > 0 for r in reports), reports
    fsdp, earlier = weights(tmp_path / "fsdp" / "checkpoint-4"), weights(tmp_path / "fsdp" / "checkpoint-2")
    close(fsdp, weights(tmp_path / "single" / "checkpoint-4"), earlier)
    assert sum(not torch.equal(earlier[k], v) for k, v in fsdp.items()) > len(fsdp) // 2  # training moved them

    if kind == "lora":  # resume under FSDP from the step-2 checkpoint: the same step-4 weights
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
        shutil.copy(tmp_path / "fsdp" / "recipe.yaml", resumed / "recipe.yaml")
        launch(resumed, kind, "train.grad_accum=2", "--resume")
        assert [p.name for p in checkpoints(resumed)][-1] == "checkpoint-4"
        close(weights(resumed / "checkpoint-4"), fsdp, earlier)
