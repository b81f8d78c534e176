"""`Result`: what one metric gives, recorded by the registry's functions and read by the table, the
report writer and `compare`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# The sizes a result may give beside `n`, as metrics.json names them, and their suffix in the table's n column.
COUNTS = {"dialogs": "", "stories": "", "n_generated": " gen", "n_reference": " ref"}


@dataclass(frozen=True)
class Result:
    """One metric's outcome over a run: the value, its interval and sizes, and the facts to read it by."""

    value: float | None  # None: nothing to score, or not computable
    definition: str
    n: int | None = None  # samples scored; None for a result over image sets or stories
    interval: tuple[float, float] | None = None  # 95% percentile bootstrap bounds of the mean
    std: float | None = None  # spread over splits (IS)
    per_item: dict[str, float] | None = None  # sample id -> value, for the per-sample CSV
    not_computable: str | None = None  # why value is None though there was something to score
    counts: dict[str, int | None] = field(default_factory=dict)  # COUNTS; None: not known
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> how many samples (or stories)
    compat: str | None = None  # the original scripts' quirk this result follows
    model: str | None = None
    weights: str | None = None
    details: dict = field(default_factory=dict)  # other facts worth recording: the resize, the splits, ...

    def record(self) -> dict:
        """The result as metrics.json holds it: unset fields left out, but a result over samples always
        states its interval (`ci95`, null when it has none: corpus BLEU, nothing scored)."""
        r = {"value": self.value}
        if self.std is not None:
            r["std"] = self.std
        if self.n is not None or self.interval is not None:
            r["ci95"] = list(self.interval) if self.interval else None
        if self.n is not None:
            r["n"] = self.n
        r |= self.counts
        r["definition"] = self.definition
        for key in ("compat", "model", "weights", "not_computable"):
            if getattr(self, key) is not None:
                r[key] = getattr(self, key)
        if self.left_out:
            r["left_out"] = self.left_out
        return r | self.details

    @classmethod
    def from_record(cls, record: dict) -> Result:
        """A result read back from metrics.json (its per-item values are in the CSV, not here)."""
        r = dict(record)
        ci = r.pop("ci95", None)
        counts = {k: r.pop(k) for k in COUNTS if k in r}
        typed = {f.name: r.pop(f.name) for f in fields(cls) if f.name in r}
        return cls(**{"value": None, "definition": "", **typed}, interval=tuple(ci) if ci else None, counts=counts,
                   details=r)

    def size(self) -> str:
        """What the value is computed over, for a table: the samples, else the other counts."""
        if self.n is not None:
            return str(self.n)
        return " / ".join(f"{'?' if v is None else v}{COUNTS[k]}" for k, v in self.counts.items())
