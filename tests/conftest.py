import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Offline, always; tiny backbones are built into a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MINIGPT5_CACHE", tempfile.mkdtemp(prefix="minigpt5-test-cache-"))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "recipes" / "debug"
sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process training run gets its own accelerate state, as a new process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_cli(*argv: str) -> int:
    """Run `minigpt5 ARGV` in-process through the real entry point; return its exit code."""
    from minigpt5_cli.cli import main

    try:
        main(list(argv))
    except SystemExit as e:
        return e.code or 0
    return 0


# Two CPU processes over gloo, as `accelerate launch` starts them on a machine without GPUs.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "minigpt5_cli"]


def launch(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`accelerate launch -m minigpt5_cli ARGV` on two CPU processes, offline; its output captured."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*LAUNCH, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
