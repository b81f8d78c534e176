"""`minigpt5 evaluate --compare`: two metrics.json side by side, with B - A and which run is better."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import read_json
from minigpt5_cli.evaluation.evaluate import fmt
from minigpt5_cli.evaluation.registry import METRICS
from minigpt5_cli.evaluation.result import Result


def _lower_is_better(name: str) -> bool:
    return name in METRICS and METRICS[name].lower_is_better


def _load_report(path: str | Path) -> dict:
    """A metrics.json, its records read back as `Result`s."""
    p = Path(path)
    p = p / "metrics.json" if p.is_dir() else p
    report = read_json(p)
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict) or \
            not all(isinstance(r, dict) for r in report["metrics"].values()):
        raise UserError(f"{p} is not a metrics.json written by evaluate")
    return {**report, "metrics": {name: Result.from_record(r) for name, r in report["metrics"].items()}}


def _describe(report: dict) -> str:
    run = report.get("run", {})
    model = run.get("model") or {}
    parts = [run.get("mode") or run.get("source") or "?", model.get("checkpoint") or model.get("llm") or ""]
    return " ".join(p for p in parts if p)


def compare(run_a: str | Path, run_b: str | Path) -> Table:
    """Two metrics.json side by side, with B - A for each metric both hold."""
    a, b = _load_report(run_a), _load_report(run_b)
    t = Table(title=f"A: {run_a} ({_describe(a)})\nB: {run_b} ({_describe(b)})")
    for col in ("metric", "A", "B", "B - A", "better"):
        t.add_column(col, justify="left" if col in ("metric", "better") else "right")
    notes = []
    for name in dict.fromkeys([*a["metrics"], *b["metrics"]]):
        ra, rb = a["metrics"].get(name), b["metrics"].get(name)
        va, vb = (r.value if r else None for r in (ra, rb))
        delta = vb - va if va is not None and vb is not None else None
        lower = _lower_is_better(name)
        better = "" if delta is None or delta == 0 else ("B" if (delta < 0) == lower else "A")
        t.add_row(name, _cell(ra), _cell(rb), "-" if delta is None else f"{delta:+.4f}",
                  better + (" (lower is better)" if lower and better else ""))
        for key in ("definition", "model", "weights", "compat"):
            if ra and rb and getattr(ra, key) != getattr(rb, key):
                notes.append(f"{name}: the two runs differ in {key}")
    for label, report in (("A", a), ("B", b)):
        if report.get("skipped"):
            notes.append(f"skipped in {label}: {', '.join(report['skipped'])}")
    if a.get("samples") != b.get("samples"):
        notes.append(f"sample counts differ: {a.get('samples')} vs {b.get('samples')}")
    t.caption = "\n".join(notes) or None
    return t


def _cell(r: Result | None) -> str:
    if r is None:
        return "-"
    return fmt(r.value) + (f" [{fmt(r.interval[0], 3)}, {fmt(r.interval[1], 3)}]" if r.interval else "")
