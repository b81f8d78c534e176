"""`minigpt5 scores`: a benchmark's score table from judgements, a thin command over scores.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

SCORES_HELP = """Score judged outputs as the benchmark's own script does, print the table and write it as JSON.

isg: ISG-Bench's structure, image, block and holistic scores per category and model, from the judgements of \
`minigpt5 judge --benchmark isg` or ISG-eval.py's own output. mmie: MMIE's AVG, SA, PBL and MSR per model, \
from `minigpt5 judge --benchmark mmie` or MMIE's main.py output (its JSON list with "gpt_feedback"). \
A record without a "model" belongs to the model its file is named after.

--compat isg reproduces calculate_performance.py where it errs: its "Style Transer" category, Semantic \
Segmentation samples left out, a block score written as text scoring the sample 1, and 0 for a category \
without samples. The default says how many samples these change.

\b
Examples:
  minigpt5 scores --benchmark isg isg_judgements.jsonl --output isg_scores.json
  minigpt5 scores --benchmark isg ISG_eval/model_0_-1_judge.jsonl --output isg_scores.json --compat isg
  minigpt5 scores --benchmark mmie mmie_judgements.jsonl eval_outputs/eval_result.json --output mmie_scores.json
"""


def scores(
    judgements: list[Path] = typer.Argument(..., help="Judgement files (JSON Lines named .jsonl, or a JSON list)."),
    benchmark: str = typer.Option(..., "--benchmark", help="isg or mmie."),
    output: Path = typer.Option(..., "--output", "-o", help="The scores to write (JSON)."),
    compat: Optional[str] = typer.Option(None, "--compat", help="isg: the scores exactly as ISG's "
                                         "calculate_performance.py computes them, its errors included."),
) -> None:
    from rich.console import Console
    from rich.markup import escape

    from minigpt5_cli.display import plural
    from minigpt5_cli.errors import UserError
    from minigpt5_cli.files import writable_file
    from minigpt5_cli.interleaved import scores as scoring

    if benchmark not in scoring.BENCHMARKS:
        raise UserError(f"--benchmark {benchmark!r}: the choices are {', '.join(scoring.BENCHMARKS)}")
    if compat is not None and compat != benchmark:
        raise UserError(f"--compat {compat!r}: with --benchmark {benchmark}, the only choice is {benchmark}")
    writable_file(output, "--output")
    report = scoring.compute(benchmark, judgements, compat)
    scoring.write(report, output)
    console = Console()
    for table in scoring.tables(report):
        console.print(table)
    err = Console(stderr=True)
    for category, n in report.get("unplaced", {}).items():
        why = " (left out by ISG's script)" if compat and category == "Semantic Segmentation" else ""
        err.print(f"[yellow]warning:[/] {plural(n, 'sample')} of subcategory {escape(repr(category))} counted in no "
                  f"category{why}", highlight=False, soft_wrap=True)
    if n := report.get("text_scores"):
        err.print(f"[yellow]warning:[/] {plural(n, 'sample')} with a block score written as text: "
                  + ("scored 1, as ISG's script does" if compat else "read as numbers (ISG's script scores such a "
                     "sample 1; --compat isg does too)"), highlight=False, soft_wrap=True)
    typer.echo(f"wrote {output}")
