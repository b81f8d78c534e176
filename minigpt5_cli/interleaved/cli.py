"""`minigpt5 arena sample` and `minigpt5 arena results`: thin commands over arena.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

arena_app = typer.Typer(
    help="OpenING's Interleaved Arena: which models meet on which instance, then their win rates.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

SAMPLE_HELP = """Pair models on OpenING's instances, in OpenING's pair file format: per subtask, the models
shuffled into a ring of pairs dealt in turn from a random offset; each further pair of an instance shares
no model with its first. Seeded: the same seed and file give the same pairs. Model ids are their positions
in --baseline (OpenING's Interleaved_Arena/baseline_models.json), or in --models without it.

\b
Examples:
  minigpt5 arena sample --data OpenING-benchmark/test_data.jsonl --models MiniGPT-5,gill,Emu2,Human --output pairs.json
  minigpt5 arena sample --data OpenING-benchmark --baseline Interleaved_Arena/baseline_models.json --seed 1 -o pairs.json
"""

RESULTS_HELP = """Win rates from judged pairs (OpenING's result files: a JSON list, or JSON Lines named .jsonl, of
pairs with a "winner": A, B, Tie(A), Tie(B) or Tie). Per model, overall and against each opponent: FDT
(Tie(A)/Tie(B) count as that side's win), without tie (decided battles only), tie 0 and tie 0.5, each with
a 95% Wilson interval. A judgement repeated (same data_id, A and B ids) counts once, the last one read.
--compat opening divides the per-opponent without-tie rates by all battles, ties too, as OpenING's script.
--human adds the judge's agreement with human labels, as OpenING's calculate_agreement.py: with tie,
without tie and FDT. The labels: files in the judgements' format (OpenING's judge_modelAB_results.json), or,
with --study, the answer files raters exported from a rate build page over two of the models (named as in
the judgements, their story ids the data_ids); each rater's answer to --question is one label.

\b
Examples:
  minigpt5 arena results judgements.jsonl --output results.json
  minigpt5 arena results judgements.jsonl --human Interleaved_Arena/judge_modelAB_results.json -o results.json
  minigpt5 arena results judgements.jsonl --study study --human rater1.json --human rater2.json -o results.json
  minigpt5 arena results intjudge_rag-judge_modelAB_results.json --output results.json --compat opening
"""


@arena_app.command("sample", help=SAMPLE_HELP, short_help="Pairs of models per OpenING instance, seeded.")
def sample(
    data: Path = typer.Option(..., "--data", help="OpenING's test_data.jsonl or dev_data.jsonl, the folder "
                              "prepare-data opening wrote, or a folder holding one of them."),
    models: Optional[str] = typer.Option(None, "--models", help="Model names, separated by commas \\[default: "
                                         "every model in --baseline].", show_default=False),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="OpenING's baseline_models.json: the ids "
                                            "and names of the models."),
    per_instance: int = typer.Option(2, "--per-instance", help="Pairs per instance."),
    seed: int = typer.Option(0, help="Draws the pairs."),
    output: Path = typer.Option(..., "--output", "-o", help="The pair file to write (JSON)."),
) -> None:
    from minigpt5_cli.interleaved import arena
    from minigpt5_cli.files import writable_file

    chosen = arena.read_models(models, baseline)
    writable_file(output, "--output")
    pairs = arena.sample(arena.read_instances(data), chosen, per_instance, seed)
    arena.write_pairs(pairs, output)
    typer.echo(f"wrote {output}: {len(pairs)} pairs of {len(chosen)} models")


@arena_app.command("results", help=RESULTS_HELP, short_help="Win rates from judged pairs.")
def results(
    judgements: list[Path] = typer.Argument(..., help="Judged pair files (JSON list, or .jsonl)."),
    output: Path = typer.Option(..., "--output", "-o", help="results.json to write."),
    compat: Optional[str] = typer.Option(None, "--compat", help="opening: the per-opponent without-tie rates "
                                         "as OpenING computes them (ties in the denominator)."),
    human: Optional[list[Path]] = typer.Option(None, "--human", help="Human labels of the same battles: a file "
                                               "in the judgements' format, or with --study a rater's answer file "
                                               "(repeat the option for several)."),
    study: Optional[Path] = typer.Option(None, "--study", help="The study folder rate build wrote, whose key "
                                         "unblinds the --human answer files."),
    question: str = typer.Option("together", "--question", help="With --study: the question whose answers are "
                                 "the labels."),
) -> None:
    from rich.console import Console

    from minigpt5_cli.interleaved import arena
    from minigpt5_cli.errors import UserError
    from minigpt5_cli.files import writable_file

    if compat is not None and compat not in arena.COMPATS:
        raise UserError(f"--compat {compat!r}: the choices are {', '.join(arena.COMPATS)}")
    writable_file(output, "--output")
    if study is not None and not human:
        raise UserError("--study needs --human: the answer files its raters exported")
    judged = arena.read_judgements(judgements)
    report = arena.aggregate(judged, compat)
    if human:
        labels = arena.rated(study, human, question, judged) if study else arena.read_judgements(human)
        report["agreement"] = {"human": [str(h) for h in human], "study": str(study) if study else None,
                               "question": question if study else None, **arena.agreement(labels, judged)}
    arena.write_results(report, output)
    Console().print(arena.table(report))
    if human:
        typer.echo(arena.agreement_line(report["agreement"]))
    if n := arena.differences(report):
        typer.echo(f"warning: {n} per-opponent without-tie rates differ between OpenING's definition (ties in the "
                   "denominator) and the plain one (decided battles only); "
                   + ("these are OpenING's" if compat else "these are the plain ones; --compat opening gives theirs"),
                   err=True)
    typer.echo(f"wrote {output}")
