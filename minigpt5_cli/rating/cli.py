"""`minigpt5 rate build` and `minigpt5 rate results`: thin commands over build.py and results.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

rate_app = typer.Typer(
    help="Human A/B rating of two generate outputs: a static study page, then its results.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

BUILD_HELP = """A study folder from two generate outputs over the same stories (matched by id).
STUDY/raters/ is what the raters get: one page, index.html, that they open from disk, and its
images. It shows each story's beginning, then the two continuations as A and B, in an order and
with sides drawn per rater, the models unnamed, and asks the paper's three questions (language,
image quality, text and image together): A, B or tie. Answers stay in the browser and download as
one JSON file per rater. STUDY/key.json is the key that `rate results` unblinds them with: keep it
from the raters. Only images inside the two outputs are taken; links out of them are refused.

\b
Examples:
  minigpt5 rate build --a out/vist --b out/baseline --output study
  minigpt5 rate build --a out/vist --b out/baseline --output study --seed 7 --title "Story study"
"""

RESULTS_HELP = """Unblind the raters' answer files with the study's key (STUDY/key.json) and aggregate
them: per question the share of judgements preferring each model (named by its output folder) and
ties with 95% Wilson intervals, a sign test p-value, Fleiss' kappa and each rater's agreement with
the others. Prints a table, writes results.json and preferences.png (to STUDY unless --output says
otherwise).

\b
Examples:
  minigpt5 rate results study answers-*.json
  minigpt5 rate results study/key.json answers-*.json --output results
"""


@rate_app.command("build", help=BUILD_HELP, short_help="A static A/B study page from two generate outputs.")
def build(
    a: Path = typer.Option(..., "--a", help="A generate output folder."),
    b: Path = typer.Option(..., "--b", help="Another, over the same stories."),
    output: Path = typer.Option(..., "--output", "-o", help="The study folder to write."),
    seed: Optional[int] = typer.Option(None, help="Draws the sides and each rater's order; recorded in the "
                                       "key, and whoever knows it can unblind the study \\[default: a random "
                                       "one].", show_default=False),
    title: str = typer.Option("", help="The page's title \\[default: Which continuation is better?].",
                              show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a study folder rate build wrote."),
) -> None:
    from minigpt5_cli.rating.build import KEY_FILE, PAGE, RATERS, build as run

    key = run(a, b, output, seed=seed, title=title, overwrite=overwrite)
    typer.echo(f"study {key['study']}: {len(key['pairs'])} pairs\n"
               f"send to the raters: {output / RATERS} (the whole folder; they open {PAGE} in it)\n"
               f"keep to yourself:   {output / KEY_FILE} (it tells which model is which; "
               f"minigpt5 rate results {output} ANSWERS... reads it)")


@rate_app.command("results", help=RESULTS_HELP, short_help="Unblind and aggregate the raters' answers.")
def results(
    study: Path = typer.Argument(..., help="The study folder rate build wrote (or its key.json)."),
    answers: list[Path] = typer.Argument(..., help="The raters' answer files (JSON, one per rater)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where results.json and preferences.png "
                                          "go \\[default: the key's folder].", show_default=False),
) -> None:
    from rich.console import Console

    from minigpt5_cli.rating import results as stage

    report, folder = stage.results(study, answers, output)
    console = Console()
    console.print(stage.table(report))
    console.print(stage.rater_table(report))
    typer.echo(f"wrote {folder / stage.RESULTS} and {folder / stage.PLOT}")
