"""Outputs written beside their place (`files.staged`): the partial folders of killed runs are removed by
the next run into the same output, never those of a run still writing."""

import subprocess
import sys
import time
from pathlib import Path

from minigpt5_cli.files import staged

from conftest import REPO

# Enters `staged(OUT)`, writes a file, touches MARKER and waits until it is killed.
WRITING = """
import sys, time
from pathlib import Path
from minigpt5_cli.files import staged

with staged(Path(sys.argv[1]), replace=False) as tmp:
    (tmp / "part").write_text("x")
    Path(sys.argv[2]).touch()
    while True:
        time.sleep(0.01)
"""


def writing(out: Path, marker: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITING, str(out), str(marker)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1]
    return proc


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def test_a_rerun_removes_what_killed_runs_left_but_not_what_a_live_run_writes(tmp_path):
    out = tmp_path / "out"
    killed = writing(out, tmp_path / "killed")
    killed.kill()  # SIGKILL: no cleanup runs
    killed.wait()
    stale = partials(out)
    assert len(stale) == 1 and (stale[0] / "part").is_file()
    live = writing(out, tmp_path / "live")
    try:
        held = [p for p in partials(out) if p not in stale]
        with staged(out, replace=False) as tmp:
            (tmp / "data").write_text("new")
        assert partials(out) == held, "the killed run's folder is gone, the live run's is left alone"
        assert (held[0] / "part").is_file()
        assert sorted(p.name for p in out.iterdir()) == ["data"]
    finally:
        live.kill()
        live.wait()
    with staged(out, replace=True) as tmp:  # replacing moves the old folder aside: nothing of it stays either
        (tmp / "data").write_text("newer")
    assert partials(out) == [] and (out / "data").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "live", "out"]
