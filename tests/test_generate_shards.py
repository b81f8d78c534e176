"""generate over several processes (accelerate launch) or shards (--shard K/N): each story is generated
once, by one of them, and the folder written is the one a single process writes, byte for byte."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, launch, run_cli

# 9 stories in batches of 2: 5 batches, 3 for the first of two processes and 2 for the second. Sampled
# (temperature 1), so that the text depends on each story's seed.
ARGS = ["--diffusion-steps", "2", "--max-new-tokens", "24", "-b", "2", "--temperature", "1"]
SHAPES = ["red circle", "blue square", "green triangle", "yellow circle", "red square", "blue triangle",
          "green circle", "yellow square", "red triangle"]
FIRST = ["s0", "s1", "s4", "s5", "s8"]  # shard 1 of 2: batches 1, 3 and 5


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    path = tmp_path_factory.mktemp("stories") / "stories.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "steps": [{"text": f"Draw a {shape} at the top left."}]}) +
                            "\n" for i, shape in enumerate(SHAPES)))
    return path


@pytest.fixture(scope="module")
def reference(stories, tmp_path_factory):
    """What one process writes."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_cli("generate", "-s", str(stories), "-o", str(out), *ARGS) == 0
    return out


def generate(stories, out, *extra) -> int:
    return run_cli("generate", "-s", str(stories), "-o", str(out), *ARGS, *extra)


def files_of(folder) -> dict:
    """Every file under `folder`, hidden ones included: {relative path: bytes}."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_write_what_one_writes(stories, reference, tmp_path):
    out = tmp_path / "out"
    proc = launch("generate", "-s", str(stories), "-o", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"9 stories in {out}; open {out / 'index.html'}"], "the main process says it"
    assert files_of(out) == files_of(reference)


def test_shards_run_one_after_another_write_what_one_run_writes(stories, reference, tmp_path, capsys):
    """--shard 1/2 does its batches only and leaves the index to the run that finishes the job: --shard 2/2,
    or a plain run, which does only what is missing."""
    out = tmp_path / "out"
    assert generate(stories, out, "--shard", "1/2") == 0
    assert f"5 of 9 stories in {out}; the other shards are still to run" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == FIRST  # no index.html yet
    shutil.copytree(out, tmp_path / "stopped")
    assert generate(stories, out, "--shard", "2/2") == 0
    assert f"9 stories in {out}; open {out / 'index.html'}" in capsys.readouterr().out
    assert files_of(out) == files_of(reference)
    assert generate(stories, tmp_path / "stopped") == 0
    assert "5 stories already under" in capsys.readouterr().err
    assert files_of(tmp_path / "stopped") == files_of(reference)


def test_progress_counts_the_stories_every_process_finishes(stories, reference, tmp_path, monkeypatch, capsys):
    """A shard's progress is the whole job's: s2, of the other shard, written meanwhile by another process
    (copied here once the first batch is done), counts too."""
    from minigpt5_cli import display
    from minigpt5_cli.generation import generate as G

    monkeypatch.setattr(display, "PLAIN_EVERY", 0)
    out, run_batch = tmp_path / "out", G.run_batch

    def and_another_process(settings, jobs, *args):
        run_batch(settings, jobs, *args)
        if jobs[0].index == 0:
            shutil.copytree(reference / "s2", out / "s2")

    monkeypatch.setattr(G, "run_batch", and_another_process)
    assert generate(stories, out, "--shard", "1/2") == 0
    counts = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("stories ")]
    counts = [c for i, c in enumerate(counts) if not i or c != counts[i - 1]]
    assert counts == ["stories 0/9", "stories 3/9", "stories 5/9", "stories 6/9"], counts


# Runs generate as the command line does, killed (SIGKILL, nothing cleaned up) once story s3's list and
# one of its files are in its folder, the other files not yet: s2, its batch-mate, is written whole.
KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path

replace, moved = Path.replace, []

def replace_then_die(self, target):
    done = replace(self, target)
    moved.extend([target] if Path(target).parent.name == "s3" else [])
    if len(moved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return done

Path.replace = replace_then_die
from minigpt5_cli.cli import main
main(sys.argv[1:])
"""


def test_a_story_killed_while_written_is_done_again(stories, reference, tmp_path, monkeypatch):
    """Not taken as finished, its files not taken for someone else's: the rerun writes it whole, with the
    batch-mate it had (already written, not rewritten), and the killed run's partial folder is gone."""
    from minigpt5_cli.generation.output import PENDING

    out = tmp_path / "out"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("s2", "s3", "index.html"))  # a run stopped earlier
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, "generate", "-s", str(stories), "-o", str(out),
                           *ARGS], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / "s3" / PENDING).is_file() and not (out / "s3" / "story.json").exists()
    partial = list((out / "s3").glob(".story.json.partial-*"))  # inside the story's folder, never outside --output
    assert len(partial) == 1 and len(list((out / "s3").iterdir())) == 3
    assert files_of(out / "s2") == files_of(reference / "s2")
    written = (out / "s2" / "story.json").stat().st_mtime_ns
    from minigpt5_cli.generation import generate as G

    run, batches = G.run_batch, []
    monkeypatch.setattr(G, "run_batch", lambda settings, jobs, *a: batches.append([j.story.id for j in jobs]) or
                        run(settings, jobs, *a))
    assert run_cli("generate", "-s", str(stories), "-o", str(out), *ARGS) == 0
    assert batches[0] == ["s2", "s3"]  # s3 beside the batch-mate it had, so padded alike
    assert files_of(out) == files_of(reference)
    assert (out / "s2" / "story.json").stat().st_mtime_ns == written


def test_every_process_refuses_alike_and_the_main_one_says_why(stories, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("mine")
    proc = launch("generate", "-s", str(stories), "-o", str(out), *ARGS)
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == \
        [f"error: {out / 'index.html'} was not written by minigpt5; pick another --output"], proc.stderr[-3000:]
    assert "minigpt5_cli/" not in proc.stderr, proc.stderr[-3000:]  # the launcher's report only, no trace of ours
    assert [p.name for p in out.iterdir()] == ["index.html"]
