"""Cold start: how long `minigpt5` takes from a fresh process, against `python -c "import torch"`.

Every command runs in a new subprocess (nothing cached in memory between runs except what the OS
keeps of the files), repeated and interleaved with the baseline, so machine noise hits them alike:

  baseline       python -c "import torch"   (the floor every torch program pays)
  help           python -m minigpt5_cli --help
  generate-help  python -m minigpt5_cli generate --help
  generate       python -m minigpt5_cli generate --story "Draw a red circle at the top left." --output TMP
                 (the shipped shapes-world model, offline; a new output folder each run)

Prints each command's median and its ratio to the baseline's median, then the largest cumulative
imports of `python -X importtime -m minigpt5_cli generate --help`.

    python benchmarks/cold_start.py
    python benchmarks/cold_start.py --repeats 7 --generate-repeats 3 --top 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORY = "Draw a red circle at the top left."


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return elapsed


def imports(top: int, env: dict[str, str]) -> list[tuple[float, str]]:
    """The largest cumulative import times (seconds) of `generate --help`: the modules it imports itself
    (top level) and the packages (names without a dot, at any depth)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "minigpt5_cli", "generate", "--help"], env=env,
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        if not name.startswith("  ") or "." not in name:
            rows.append((int(cumulative) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of the baseline and the --help commands")
    parser.add_argument("--generate-repeats", type=int, default=3, help="runs of generate (each is a first one)")
    parser.add_argument("--top", type=int, default=12, help="imports listed")
    args = parser.parse_args()

    env = environment()
    py = [sys.executable]
    commands = {
        "baseline": py + ["-c", "import torch"],
        "help": py + ["-m", "minigpt5_cli", "--help"],
        "generate-help": py + ["-m", "minigpt5_cli", "generate", "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in [*commands, "generate"]}
    timed(commands["baseline"], env)  # warm the OS file cache once: every later run finds it alike
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(max(args.repeats, args.generate_repeats)):
            for name, command in commands.items():
                if i < args.repeats:
                    times[name].append(timed(command, env))
            if i < args.generate_repeats:
                out = Path(tmp) / f"run{i}"
                times["generate"].append(timed(py + ["-m", "minigpt5_cli", "generate", "--story", STORY, "--output",
                                                     str(out)], env))

    floor = statistics.median(times["baseline"])
    print(f"cold start, median of {args.repeats} runs ({args.generate_repeats} for generate), "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'command':<15}{'median s':>10}{'min s':>8}{'max s':>8}{'x import torch':>16}")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:<15}{median:>10.2f}{min(runs):>8.2f}{max(runs):>8.2f}{median / floor:>16.2f}")

    print("\nlargest imports of `generate --help` (cumulative, one run; top-level modules and packages):")
    for seconds, name in imports(args.top, env):
        print(f"  {seconds:6.3f} s  {name}")
    print(f"\nreproduce: python {Path(__file__).relative_to(REPO)} --repeats {args.repeats} "
          f"--generate-repeats {args.generate_repeats}")


if __name__ == "__main__":
    main()
