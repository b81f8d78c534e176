"""The README's Quick start and shapes-world commands, run in order as written, in a fresh folder."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
SECTIONS = ("Quick start", "The shapes world")  # each with its subsections

# Commands of those sections that a test cannot run, by their first words, and why. Any other command that is
# not `minigpt5 ...` fails the test, so a new one has to be run or listed here.
SKIP = {
    ("python3", "-m", "venv"): "sets up the environment the tests already run in",
    ("pip", "install"): "installs packages; the tests run offline in the installed environment",
    ("python", "-m", "pytest"): "the test suite itself",
    ("bash", "recipes/toy/chain.sh"): "34 minutes; test_scratch.py::test_quick_chain_runs_from_nothing runs it with "
                                      "QUICK=1 (test_chain_line_is_the_tested_script checks it is the same script)",
    ("bash", "recipes/toy/experiment.sh"): "27 minutes of training after the chain",
    ("bash", "recipes/toy/unseen.sh"): "the chain's 34 minutes on held-out data, then generate and evaluate; "
                                      "test_toy.py::test_hold_out_keeps_its_combinations_out_of_every_training_record "
                                      "checks the data it trains on",
    ("accelerate", "launch"): "several GPUs",
}


def sections(text: str) -> dict[str, str]:
    """Each `## ` section of a markdown text by its title, its `###` subsections included."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(section, argv) for every command in the ```bash blocks of SECTIONS of the markdown file at `path`,
    in order; comments dropped, continued lines joined."""
    found = sections(path.read_text(encoding="utf-8"))
    out = []
    for title in SECTIONS:
        assert title in found, f"no section '## {title}' in {path}"
        for block in re.findall(r"^```bash\n(.*?)^```", found[title], flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv:
                    out.append((title, argv))
    return out


def opened(path: Path) -> list[str]:
    """The files SECTIONS of the markdown file at `path` tell the reader to open ("open `out/x/story.html`")."""
    found = sections(path.read_text(encoding="utf-8"))
    return [f for title in SECTIONS for f in re.findall(r"open `([^`\s]+)`", found[title])]


def skipped(argv: list[str]) -> str | None:
    """Why `argv` is not run, or None when it is run."""
    return next((why for words, why in SKIP.items() if tuple(argv[:len(words)]) == words), None)


def run_readme(path: Path, cwd: Path) -> list[str]:
    """Run the `minigpt5` commands of the markdown file at `path` in `cwd`, in order, through the real entry point;
    fail on the first that exits non-zero or on a command neither run nor listed in SKIP. Returns the runs."""
    shutil.copytree(REPO / "recipes", cwd / "recipes")  # the debug recipes and their data, named relative to cwd
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ran = []
    for title, argv in commands(path):
        if skipped(argv):
            continue
        assert argv[0] == "minigpt5", f"{title}: `{shlex.join(argv)}` is neither run nor listed in SKIP"
        done = subprocess.run([sys.executable, "-m", "minigpt5_cli", *argv[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{title}: `{shlex.join(argv)}` exited {done.returncode}:\n{done.stderr[-4000:]}"
        # what the command itself says to open ("1 story in out/shapes; open out/shapes/story.html")
        for name in re.findall(r"open (\S+)", done.stdout):
            assert (cwd / name).is_file(), f"`{shlex.join(argv)}` says to open {name}, which is missing"
        ran.append(shlex.join(argv))
    for name in opened(path):
        assert (cwd / name).is_file(), f"the README says to open {name}, which its commands did not write"
    return ran


def test_parser_finds_the_commands():
    """Both sections give commands to run, and the README's own files to open; a parser finding nothing would
    make the run below pass vacuously."""
    found = commands(README)
    for title in SECTIONS:
        assert any(argv[0] == "minigpt5" for t, argv in found if t == title), title
    assert "out/shapes/story.html" in opened(README)
    assert all(argv[0] == "minigpt5" or skipped(argv) for _, argv in found)


def test_chain_line_is_the_tested_script():
    """The README's chain command runs recipes/toy/chain.sh, the script test_quick_chain_runs_from_nothing runs with
    QUICK=1, and the README says QUICK=1 exists."""
    lines = [argv for _, argv in commands(README) if argv[:2] == ["bash", "recipes/toy/chain.sh"]]
    assert len(lines) == 1 and len(lines[0]) == 3, lines  # bash SCRIPT ROOT
    assert "QUICK=1" in README.read_text(encoding="utf-8")
    assert "QUICK" in (REPO / lines[0][1]).read_text(encoding="utf-8")
    scratch = (REPO / "tests" / "test_scratch.py").read_text(encoding="utf-8")
    assert "def test_quick_chain_runs_from_nothing" in scratch and '"toy" / "chain.sh"' in scratch


def test_readme_commands_run(tmp_path):
    """Every command of the Quick start and the shapes-world section exits 0 in a fresh folder, in order."""
    ran = run_readme(README, tmp_path)
    assert any(c.startswith("minigpt5 generate --story data/toy/stories_test") for c in ran), ran


def test_broken_readme_fails(tmp_path):
    """A README whose first command is broken fails the run (before any other command)."""
    text = README.read_text(encoding="utf-8")
    line = next(ln for ln in sections(text)["Quick start"].splitlines() if ln.startswith("minigpt5 "))
    broken = tmp_path / "README.md"
    broken.write_text(text.replace(line, line + " --no-such-option", 1), encoding="utf-8")
    (tmp_path / "run").mkdir()
    with pytest.raises(AssertionError, match="--no-such-option` exited 2"):
        run_readme(broken, tmp_path / "run")


def test_every_readme_command_names_real_commands_and_options():
    """Every `minigpt5 ...` line of the README's bash blocks, in every section (most need data or weights this
    machine lacks, so they are not run), names an existing command and only options that command has."""
    import typer

    from minigpt5_cli.cli import app

    root = typer.main.get_command(app)
    checked = 0
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] != ["minigpt5"]:
                continue
            command, words = root, argv[1:]
            while hasattr(command, "commands") and words and words[0] in command.commands:  # a group (typer's click)
                command, words = command.commands[words[0]], words[1:]
            assert not hasattr(command, "commands"), f"`{line}` names no command of {command.name}"
            known = {name for p in command.params for name in p.opts + p.secondary_opts}
            for word in words:
                if word.startswith("-") and word != "-":
                    assert word.split("=")[0] in known, f"`{line}`: {command.name} has no option {word}"
            checked += 1
    assert checked > 40, checked  # the parser found the README's commands
