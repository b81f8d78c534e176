"""Benchmark scores from judgements, computed as each benchmark's own script computes them.

ISG-Bench (its calculate_performance.py), per model and per category (its 20 subcategories grouped into 8):
structure, the share of samples whose structure matched; block, the mean over samples of their block
questions' mean score (a sample whose structure failed, or that has no result, counts 1; one whose structure
matched but that has no block question counts nothing); image, the mean over samples of their Yes answers
over their image questions (0 without any, or without a result); holistic, the mean of overall_score (1
without one, or when the output is empty or starts with an empty block). Read from our judgements or from
ISG-eval.py's own output. Where their script errs the default differs and says so; compat "isg" reproduces it:
- its category table spells "Style Transer" and leaves out "Semantic Segmentation", whose samples then count
  nowhere; by default the category is "Style Transfer" and Semantic Segmentation counts under Image
  Decomposition (segmenting, like detecting objects, takes an image apart);
- a block score written as text ("7") makes it score the whole sample 1; by default it is read as a number;
- a category without samples shows 0 there, no score (null) by default.

MMIE (its main.py): the score read from each judge's feedback, those within 0-6 averaged (3 decimals) over
all samples (AVG) and by the id's task, SA, PBL or MSR, looked for in that order. Read from our judgements or
from main.py's own output (a JSON list of samples with "gpt_feedback").
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import json_records, write_atomic
from minigpt5_cli.interleaved import mmie

FORMAT = "minigpt5-scores"
BENCHMARKS = ("isg", "mmie")
LEVELS = ("structure", "block", "image", "holistic")

# ISG's categories and their subcategories, as its calculate_performance.py groups them (its own spelling).
ISG_CATEGORIES = {
    "Style Transer": ("Art Style Transfer", "Scene Attribute Transfer", "Photo Variation", "Portrait Variation"),
    "Progressive": ("Animation Images", "Animation Text-Image", "Attribute Transfer"),
    "3D Scene": ("3D_object", "multi-Perspective Scene Generation"),
    "Image Decomposition": ("Realistic Object Detection", "Imaginary Object Detection"),
    "Image-Text Complementation": ("HowTo", "Scientific"),
    "Temporal Prediction": ("Prediction", "painting"),
    "Visual Story Telling": ("visual storytelling text-image", "visual storytelling image", "visual storytelling text"),
    "VQA": ("Object_VQA", "Historical"),
}
# The default's table: the category's name spelt right, and the subcategory theirs leaves out placed.
CATEGORIES = {("Style Transfer" if c == "Style Transer" else c):
              subs + (("Semantic Segmentation",) if c == "Image Decomposition" else ())
              for c, subs in ISG_CATEGORIES.items()}


def read_records(paths: list[Path]) -> list[tuple[str, dict]]:
    """(model, record) for every record of every file: JSON Lines (ours, ISG's) or a JSON list (MMIE's). A
    record without "model" belongs to the model the file is named after."""
    out = []
    for path in paths:
        for where, r in json_records(path, "judgements"):
            if not isinstance(r, dict) or not isinstance(r.get("id"), str):
                raise UserError(f"{where} is not a judgement (a JSON object with an id)")
            model = r.get("model")
            out.append((model if isinstance(model, str) and model else path.stem, r))
    if not out:
        raise UserError(f"no judgements in {', '.join(map(str, paths))}")
    return out


def _number(value, lenient: bool):
    """A score as a number: finite numbers as they are (bools too, as Python sums them), with `lenient` also
    text that reads as a finite number; else None (1e999 in JSON reads as inf, which no JSON can hold)."""
    if isinstance(value, (int, float)):
        try:
            return value if math.isfinite(value) else None
        except OverflowError:  # an integer too large for a float
            return None
    if lenient and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _mean(values: list, empty=None):
    return sum(values) / len(values) if values else empty


def isg_sample(r: dict, compat: bool) -> dict:
    """One sample's contributions: {level: value or None (counts nothing)}, and `text_scores` when a block
    score written as text decided its block value."""
    result = r.get("result")
    if not isinstance(result, dict):
        return {"structure": 0, "block": 1, "image": 0, "holistic": 1}
    out = {"structure": int(bool(result.get("structure")))}
    out["block"] = 1 if not out["structure"] else None
    if out["structure"] and result.get("block"):
        judged = [q["VQA_judge_Score"]["Judge"] for q in result["block"] if isinstance(q, dict)
                  and isinstance(q.get("VQA_judge_Score"), dict) and "Judge" in q["VQA_judge_Score"]]
        strict = [_number(v, False) for v in judged]
        read = [v for v in (_number(v, True) for v in judged) if v is not None]
        theirs = 1 if not judged or None in strict else _mean(strict)  # their sum() fails on text: 1
        out["block"] = theirs if compat else _mean(read, 1)
        out["text_scores"] = theirs != _mean(read, 1)
    image = result.get("image")
    if image and isinstance(image, list):
        yes = sum(isinstance(q, dict) and isinstance(q.get("judge"), dict) and isinstance(q["judge"].get("Judge"), str)
                  and q["judge"]["Judge"].lower() == "yes" for q in image)
        out["image"] = yes / len(image)
    else:
        out["image"] = 0
    holistic = result.get("holistic")
    output = r.get("output")
    score = _number(holistic.get("overall_score"), True) if isinstance(holistic, dict) else None
    empty = not output or not isinstance(output[0], dict) or output[0].get("content") == ""
    out["holistic"] = 1 if score is None or empty else score
    return out


def isg(records: list[tuple[str, dict]], compat: bool) -> dict:
    table = ISG_CATEGORIES if compat else CATEGORIES
    category_of = {sub: c for c, subs in table.items() for sub in subs}
    levels = defaultdict(lambda: {c: {level: [] for level in LEVELS} for c in table})
    unplaced, text_scores = defaultdict(int), 0
    for model, r in records:
        category = category_of.get(r.get("Category"))
        if category is None:
            unplaced[str(r.get("Category"))] += 1
            continue
        sample = isg_sample(r, compat)
        text_scores += sample.pop("text_scores", False)
        for level, value in sample.items():
            if value is not None:
                levels[model][category][level].append(value)
    models = {}
    for model, categories in levels.items():
        models[model] = {}
        for c, got in categories.items():
            n = len(got["structure"])
            models[model][c] = {"samples": n, **{level: _mean(got[level], 0 if compat else None) for level in LEVELS}}
    return {"models": models, "unplaced": dict(unplaced), "text_scores": text_scores}


def average(scores: list[int]) -> float | None:
    """The mean to 3 decimals, as MMIE computes it (numpy's mean and rounding)."""
    return float(np.round(np.mean(np.array(scores)), 3)) if scores else None


def mmie_scores(records: list[tuple[str, dict]]) -> dict:
    per = defaultdict(lambda: {"all": [], **{t: [] for t in mmie.TASKS}, "samples": 0})
    for model, r in records:
        feedback = r.get("gpt_feedback")
        if not isinstance(feedback, str):
            raise UserError(f"judgement {r['id']!r} of {model} has no gpt_feedback (the judge's text)")
        got = per[model]
        got["samples"] += 1
        score = mmie.find_score(feedback)
        if mmie.valid(score):
            got["all"].append(score)
            if (t := mmie.task(r["id"])) is not None:
                got[t].append(score)
    models = {model: {"avg": average(got["all"]), **{t.lower(): average(got[t]) for t in mmie.TASKS},
                      "samples": got["samples"], "scored": len(got["all"])} for model, got in per.items()}
    return {"models": models}


def compute(benchmark: str, paths: list[Path], compat: str | None) -> dict:
    records = read_records(paths)
    report = isg(records, compat == "isg") if benchmark == "isg" else mmie_scores(records)
    return {"format": FORMAT, "benchmark": benchmark, "compat": compat, **report}


def write(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic({output: lambda f: f.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")})


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def tables(report: dict) -> list[Table]:
    out = []
    if report["benchmark"] == "mmie":
        t = Table(title="MMIE (scores 0-6)")
        for column in ("model", "samples", "scored", "AVG", "SA", "PBL", "MSR"):
            t.add_column(column, justify="left" if column == "model" else "right")
        for model, row in report["models"].items():
            t.add_row(escape(model), str(row["samples"]), str(row["scored"]),
                      *(_cell(row[k], 3) for k in ("avg", "sa", "pbl", "msr")))
        return [t]
    for model, categories in report["models"].items():
        t = Table(title=f"ISG-Bench: {escape(model)}")
        for column in ("category", "samples", "structure", "image", "block", "holistic"):
            t.add_column(column, justify="left" if column == "category" else "right")
        for c, row in categories.items():
            t.add_row(escape(c), str(row["samples"]), *(_cell(row[k], 4) for k in ("structure", "image", "block",
                                                                                   "holistic")))
        out.append(t)
    return out
