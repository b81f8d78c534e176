"""benchmarks/gpu_check.sh --smoke: the GPU check's three parts on CPU with tiny backbones, in one table."""

import os
import subprocess
import sys

from conftest import REPO


def test_the_smoke_run_measures_each_part_and_the_shards_write_what_a_plain_run_writes():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| part | what | measured |"
    parts = {"| a | train stage 1 step": "tokens/s", "| a | train stage 2 step": "tokens/s",
             "| b | generate batch 1": "s a story", "| b | generate batch 8": "s a story",
             "| c | generate --shard 1/2 then 2/2 against a plain run": "| equal: "}
    for start, says in parts.items():
        found = [r for r in rows if r.startswith(start)]
        assert len(found) == 1 and says in found[0], (start, rows)
    assert len(rows) == 2 + len(parts)
