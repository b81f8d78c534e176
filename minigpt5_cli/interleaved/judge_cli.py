"""`minigpt5 judge`: a thin command over the benchmarks' judge modules."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from minigpt5_cli.errors import UserError

# benchmark -> the module whose `run(JudgeRun) -> str` judges it (the line it returns is printed)
JUDGES = {"opening": "minigpt5_cli.interleaved.intjudge", "isg": "minigpt5_cli.interleaved.isg",
          "mmie": "minigpt5_cli.interleaved.mmie"}


@dataclass
class JudgeRun:
    benchmark: str
    judge: str  # opening: IntJudge's hub id or folder; isg, mmie: the model's name at --api
    exports: list[Path]  # folders `minigpt5 export` wrote (or the benchmark's own model outputs)
    output: Path  # judgements, JSON Lines: one line per judged item, appended as they finish
    pairs: Path | None = None  # opening: the pair file
    data: Path | None = None  # the folder `minigpt5 prepare-data` wrote (input images, references)
    api: str | None = None  # an OpenAI-compatible endpoint's base URL
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding its key (none needed locally)
    prompts: Path | None = None  # a checkout of the benchmark's repository, whose own prompts are then used
    batch_size: int = 4
    seed: int = 0
    compat: str | None = None
    max_new_tokens: int = 0  # 0: the benchmark's own
    trust_remote_code: bool = False
    limit: int = 0  # judge the first N items only (0: all)


JUDGE_HELP = """Judge exported model outputs with each benchmark's judge. Judgements go to --output as JSON \
Lines, one per item as it finishes: a rerun skips the items already there. Each line keeps the judge's raw \
text, the label read from it and how it was read.

opening: IntJudge (a Qwen2-VL fine-tune, loaded like any VLM of the toolkit) judges the pairs of --pairs \
between the models exported under --exports. isg: the four levels of ISG-Bench (structure, block, image, \
holistic), judged by a model behind an OpenAI-compatible chat endpoint (--api: a local vLLM server or a \
hosted one). mmie: MMIE-Score's rubric sent to an endpoint serving it (MMIE-Score needs its own remote code \
under an older transformers, so it is not loaded here; `minigpt5 scores` also reads its own output files).

\b
Examples:
  minigpt5 judge --benchmark opening --judge IntJudge/IntJudge --pairs pairs.json --exports exp \\
      --data data/opening --output judgements.jsonl
  minigpt5 judge --benchmark isg --api http://localhost:8000/v1 --judge Qwen/Qwen2.5-VL-72B-Instruct \\
      --exports exp/isg --data data/isg --prompts ISG --output isg_judgements.jsonl
  minigpt5 judge --benchmark mmie --api http://localhost:8000/v1 --judge MMIE-Score --exports exp/mmie \\
      --data data/mmie --prompts MMIE --output mmie_judgements.jsonl
"""


def judge(
    benchmark: str = typer.Option(..., "--benchmark", help="opening, isg or mmie."),
    judge_model: str = typer.Option(..., "--judge", help="opening: IntJudge's hub id or folder; isg, mmie: the "
                                    "model's name at --api."),
    exports: list[Path] = typer.Option(..., "--exports", help="Folders written by minigpt5 export (repeat the "
                                       "option for several)."),
    output: Path = typer.Option(..., "--output", "-o", help="Judgements to write (JSON Lines); a rerun continues it."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="opening: the pair file (minigpt5 arena sample)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The benchmark as minigpt5 prepare-data wrote it."),
    api: Optional[str] = typer.Option(None, "--api", help="isg, mmie: an OpenAI-compatible endpoint's base URL."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="The environment variable holding "
                                    "the endpoint's key."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A local checkout of the benchmark's "
                                           "repository: its own prompts are read from it (as text; nothing in it "
                                           "is run)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Items judged at once (isg, mmie: "
                                             "requests in flight).", show_default="4; 1 with --compat opening, "
                                             "whose judge decodes one at a time"),
    seed: int = typer.Option(0, help="Seeds the coin that decides an unreadable verdict."),
    compat: Optional[str] = typer.Option(None, "--compat", help="Reproduce the benchmark's own script exactly, "
                                         "quirks included (opening, isg, mmie)."),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", help="The judge's answer length (0: the "
                                       "benchmark's own)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let a judge folder run its own "
                                           "code."),
    limit: int = typer.Option(0, "--limit", help="Judge the first N items only (0: all); isg, mmie: "
                       "the first N of each export file."),
) -> None:
    if benchmark not in JUDGES:
        raise UserError(f"--benchmark {benchmark!r}: the choices are {', '.join(JUDGES)}")
    if compat is not None and compat != benchmark:
        raise UserError(f"--compat {compat!r}: with --benchmark {benchmark}, the only choice is {benchmark}")
    if batch_size is None:  # left-padded batches can change a greedy verdict against OpenING's one-at-a-time run
        batch_size = 1 if compat == "opening" else 4
    if batch_size < 1 or limit < 0 or max_new_tokens < 0:
        raise UserError("--batch-size must be at least 1, --limit and --max-new-tokens at least 0")
    run = JudgeRun(benchmark=benchmark, judge=judge_model, exports=list(exports), output=output, pairs=pairs,
                   data=data, api=api, api_key_env=api_key_env, prompts=prompts, batch_size=batch_size, seed=seed,
                   compat=compat, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code, limit=limit)
    typer.echo(importlib.import_module(JUDGES[benchmark]).run(run))
