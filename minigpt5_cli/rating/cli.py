"""`minigpt5 rate build` and `minigpt5 rate results`: thin commands over build.py and results.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

rate_app = typer.Typer(
    help="Human A/B rating of two generate outputs: a static study page, then its results.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

BUILD_HELP = """A study folder from two generate outputs over the same stories (matched by id): one page,
STUDY/index.html, that raters open from disk. It shows each story's beginning, then the two
continuations as A and B, in an order and with sides drawn per rater, the models unnamed, and asks
the paper's three questions (language, image quality, text and image together): A, B or tie.
Answers stay in the browser and download as one JSON file per rater. STUDY/study.json is the key
that `rate results` unblinds them with.

\b
Examples:
  minigpt5 rate build --a out/vist --b out/baseline --output study
  minigpt5 rate build --a out/vist --b out/baseline --output study --seed 7 --title "Story study"
"""

RESULTS_HELP = """Unblind and aggregate the raters' answer files: per question the share of judgements
preferring each model and ties with 95% Wilson intervals, a sign test p-value, Fleiss' kappa and
each rater's agreement with the others. Prints a table, writes results.json and preferences.png
(to STUDY unless --output says otherwise).

\b
Example:
  minigpt5 rate results study answers-*.json
"""


@rate_app.command("build", help=BUILD_HELP, short_help="A static A/B study page from two generate outputs.")
def build(
    a: Path = typer.Option(..., "--a", help="A generate output folder."),
    b: Path = typer.Option(..., "--b", help="Another, over the same stories."),
    output: Path = typer.Option(..., "--output", "-o", help="The study folder to write."),
    seed: Optional[int] = typer.Option(None, help="Draws the sides and each rater's order; recorded in the "
                                       "study \\[default: a random one].", show_default=False),
    title: str = typer.Option("", help="The page's title \\[default: Which continuation is better?].",
                              show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a study folder rate build wrote."),
) -> None:
    from minigpt5_cli.rating.build import PAGE, build as run

    key = run(a, b, output, seed=seed, title=title, overwrite=overwrite)
    typer.echo(f"study {key['study']} (seed {key['seed']}): {len(key['pairs'])} pairs in {output}; "
               f"give raters the folder and have them open {output / PAGE}")


@rate_app.command("results", help=RESULTS_HELP, short_help="Unblind and aggregate the raters' answers.")
def results(
    study: Path = typer.Argument(..., help="The study folder rate build wrote."),
    answers: list[Path] = typer.Argument(..., help="The raters' answer files (JSON, one per rater)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where results.json and preferences.png "
                                          "go \\[default: STUDY].", show_default=False),
) -> None:
    from rich.console import Console

    from minigpt5_cli.rating import results as stage

    report, folder = stage.results(study, answers, output)
    console = Console()
    console.print(stage.table(report))
    console.print(stage.rater_table(report))
    typer.echo(f"wrote {folder / stage.RESULTS} and {folder / stage.PLOT}")
