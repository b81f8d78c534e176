"""`minigpt5 evaluate`: score predictions against references with the metrics of the registry, write
metrics.json, a per-sample CSV and a table. The metric maths live in `maths.py`, the networks in
`loaders.py`, the declarations in `registry.py`, what each metric gives in `result.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from minigpt5_cli import files, processes
from minigpt5_cli.errors import UserError
from minigpt5_cli.evaluation import loaders
from minigpt5_cli.evaluation import maths as M
from minigpt5_cli.evaluation.features import ClipFeatures, InceptionFeatures, SbertFeatures
from minigpt5_cli.evaluation.registry import METRICS, PRESETS, SELECTABLE
from minigpt5_cli.evaluation.result import Result
from minigpt5_cli.evaluation.samples import PREDICTION, Sample, match, read_predictions, read_references
from minigpt5_cli.recipe import in_range

COMPAT = ("minigpt5",)


@dataclass
class Settings:
    metrics: list[str]
    compat: str | None = None
    clip_model: str | None = None  # default: `default_clip_model`
    sbert_model: str | None = None
    inception_weights: str | None = None
    wordnet: str | None = None
    fid_real_stats: str | None = None
    is_splits: int = 10
    device: str = "cpu"
    batch_size: int = 32
    resamples: int = 1000
    seed: int = 0
    skip_unavailable: bool = False
    outside: bool = False  # images named by JSON Lines files may lie outside their folders

    def check(self) -> None:
        for option, value, high in (("--is-splits", self.is_splits, 1000), ("--batch-size", self.batch_size, 4096),
                                    ("--bootstrap", self.resamples, 100_000)):
            in_range(option, value, (1, high, True, True))
        if self.compat == "minigpt5" and self.fid_real_stats:
            raise UserError("--compat minigpt5 computes FID from the reference images of the samples scored, as "
                            "the original does; leave out --fid-real-stats")


def default_clip_model(spec: str) -> str:
    """ViT-L/14, or ViT-B/32 when the mmdialog preset is asked for (as the MMDialog evaluation uses)."""
    return loaders.CLIP_MMDIALOG if "mmdialog" in [n.strip().lower() for n in spec.split(",")] else \
        loaders.CLIP_DEFAULT


def resolve_metrics(spec: str, compat: str | None = None) -> list[str]:
    """Metric names and presets, comma-separated, to the metric list (in order, no repeats)."""
    if compat not in (None, *COMPAT):
        raise UserError(f"unknown --compat {compat!r}; choose {', '.join(COMPAT)}")
    names = []
    for name in (n.strip().lower() for n in spec.split(",")):
        if name in PRESETS:
            names += PRESETS[name]
        elif name in SELECTABLE:
            names.append(name)
        elif name:
            raise UserError(f"unknown metric {name!r}; choose from {', '.join(SELECTABLE)} or a preset "
                            f"({', '.join(PRESETS)})")
    if compat == "minigpt5":
        names = ["mm_relevance_minigpt5" if n == "mm_relevance" else n for n in names]
    names = list(dict.fromkeys(names))
    if not names:
        raise UserError("no metrics asked for: give --metrics, e.g. --metrics vist")
    return names


def spread_sbert(model):
    """The loaded S-BERT model; under a launch, one whose encodings are spread over the processes."""
    return SbertFeatures(model) if processes.launched() > 1 else model


class Models:
    """The networks the asked metrics need, each loaded once; a metric whose model fails to load is
    either an error or, with `skip_unavailable`, skipped with its reason."""

    def __init__(self, s: Settings, metrics: list[str]):
        from minigpt5_cli.evaluation.wordnet import load_wordnet

        self.clip = self.sbert = self.wordnet = self.inception = None
        self.skipped: dict[str, str] = {}
        load = {
            "clip": lambda: loaders.load_clip(s.clip_model or loaders.CLIP_DEFAULT, s.device, s.batch_size),
            "sbert": lambda: spread_sbert(loaders.load_sbert(s.sbert_model, s.device)),
            "wordnet": lambda: load_wordnet(s.wordnet),
            "inception": lambda: loaders.load_inception(s.inception_weights, s.device),
        }
        for need, loader in load.items():
            wanted = [m for m in metrics if METRICS[m].needs == need]
            if not wanted:
                continue
            try:
                setattr(self, need, loader())
            except UserError as e:
                if not s.skip_unavailable:
                    raise
                self.skipped.update({m: str(e) for m in wanted})


class Scoring:
    """One evaluation run over matched pairs: the metrics' functions record into `results` (metric ->
    `Result`), sharing the feature caches."""

    def __init__(self, pairs: list[tuple[Sample, Sample]], s: Settings, models: Models, console: Console):
        self.pairs, self.s, self.models, self.console = pairs, s, models, console
        self.results: dict[str, Result] = {}
        self.memo: dict[str, object] = {}  # work that several metrics share
        self.clip = ClipFeatures(models.clip, s.batch_size)
        self.inception = InceptionFeatures(models.inception, s.device, s.batch_size)

    def mean(self, name: str, ids: list[str], values: list[float], **fields) -> None:
        """A per-sample metric: its mean, bootstrap interval, count and per-sample values."""
        self.results[name] = Result(float(np.mean(values)) if values else None, METRICS[name].definition,
                                    n=len(values), interval=self.bootstrap(values), per_item=dict(zip(ids, values)),
                                    **fields)

    def bootstrap(self, values: list[float]) -> tuple[float, float] | None:
        """The 95% interval of the mean of `values`, with the run's resamples and seed."""
        return M.bootstrap_ci(values, 0.95, self.s.resamples, self.s.seed)

    def run(self) -> None:
        for name in self.s.metrics:
            if name in self.models.skipped:
                continue
            with self.console.status(f"{name}..."):
                METRICS[name].compute(self)


def evaluate(predictions: str | Path, references: str | Path, s: Settings, output: str | Path,
             console: Console | None = None) -> dict | None:
    """Read, match, score, and write OUTPUT (metrics.json) and OUTPUT's .samples.csv beside it. The report
    returned holds the `Result`s under "metrics"; the file holds their records. Under `accelerate launch`
    the features are extracted over the processes and every process scores them all; the main process
    alone prints, writes and returns the report, the others return None."""
    s.check()
    files.writable_file(Path(output), "--output")
    procs = processes.join()
    s = on_process(s, procs)
    console = console or Console(stderr=True, quiet=not procs.main)
    preds, run = read_predictions(predictions, s.outside)
    pairs = match(preds, read_references(references, s.outside))
    models = Models(s, s.metrics)
    scoring = Scoring(pairs, s, models, console)
    scoring.run()
    report = {
        "predictions": str(predictions), "references": str(references), "prediction": PREDICTION, "run": run,
        "samples": len(pairs), "compat": s.compat,
        "bootstrap": {"level": 0.95, "resamples": s.resamples, "seed": s.seed, "method": "percentile, of the mean"},
        "metrics": scoring.results, "skipped": models.skipped,
    }
    if not procs.main:
        return None
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = {**report, "metrics": {name: r.record() for name, r in scoring.results.items()}}
    per_sample = {name: r.per_item for name, r in scoring.results.items() if r.per_item is not None}
    # Both files are written beside themselves, then moved into place: a full disk leaves the old pair whole.
    files.write_atomic({out: lambda f: f.write(json.dumps(written, indent=2, ensure_ascii=False)),
                        out.with_suffix(".samples.csv"): samples_writer(pairs, per_sample)})
    return report


def on_process(s: Settings, procs: processes.Processes) -> Settings:
    """The settings of one process of a launched run: cuda is its own GPU; FID statistics still to be
    written are computed on every process, and written by the main one only."""
    if procs.count == 1:
        return s
    stats = s.fid_real_stats
    if not procs.main and stats and not Path(stats).is_file():  # before any collective: the main one has not
        stats = None  # written it yet
    return dataclasses.replace(s, device=procs.device if s.device == "cuda" else s.device, fid_real_stats=stats)


def samples_writer(pairs, per_sample: dict[str, dict[str, float]]):
    """A function writing the per-sample CSV (a row per sample, a column per metric) to a file."""
    names = list(per_sample)

    def write(f) -> None:
        w = csv.writer(f)
        w.writerow(["id", *names])
        for p, _ in pairs:
            w.writerow([p.id, *(_fmt_csv(per_sample[n].get(p.id)) for n in names)])

    return write


def _fmt_csv(v) -> str:
    return "" if v is None else repr(float(v))


def fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(report: dict) -> Table:
    t = Table(title=f"{report['predictions']} vs {report['references']} ({report['samples']} samples)")
    for col in ("metric", "value", "95% CI", "n", "model / weights"):
        t.add_column(col, justify="right" if col in ("value", "n") else "left")
    for name, r in report["metrics"].items():
        ci = f"[{fmt(r.interval[0])}, {fmt(r.interval[1])}]" if r.interval else ""
        value = fmt(r.value) + (f" ± {r.std:.3f}" if r.std is not None else "")
        t.add_row(name + (" (compat)" if r.compat is not None else ""), value, ci, r.size(), r.model or r.weights or "")
    if report["skipped"]:
        t.caption = ("skipped, their model or data not loadable (reasons in metrics.json): "
                     + ", ".join(report["skipped"]))
    return t
