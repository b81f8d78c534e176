"""`minigpt5 rate results`: the raters' exports unblinded with the study's key and aggregated.

Per question: the share of judgements preferring each model and ties, with 95% Wilson intervals,
and a sign test of one model's wins against the other's. Agreement: Fleiss' kappa over the pairs
every rater answered, and per rater the share of their judgements that match another rater's on
the same pair. Writes `results.json` and `preferences.png`. The models are named as the key names
them (their output folders), never A or B: those are the page's sides, which change from pair to
pair and from rater to rater.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import read_json, writable_folder, write_atomic
from minigpt5_cli.rating import stats
from minigpt5_cli.rating.build import PLOT, RESULTS, read_key

EXPORT_FORMAT = "minigpt5-rating"  # what the study page writes
FORMAT = "minigpt5-results"
CHOICES = ("A", "B", "tie")


def read_answers(path: Path, key: dict) -> dict:
    """One rater's export, unblinded: {"rater", "file", "answers": {story id: {question: "a" | "b" | "tie"}}}."""
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is not a rating export (the answers file the study page downloads)")
    if doc.get("study") != key["study"] or doc.get("seed") != key["page_seed"]:
        raise UserError(f"{path} is from another study (study {doc.get('study')!r}, seed {doc.get('seed')!r}); "
                        f"this study is {key['study']!r}, seed {key['page_seed']}")
    rater, pairs = doc.get("rater"), doc.get("pairs")
    if not isinstance(rater, str) or not rater.strip() or not isinstance(pairs, list):
        raise UserError(f"{path} is a damaged rating export (no rater id or no pairs)")
    slots = {p["id"]: p["slots"] for p in key["pairs"]}
    questions = {q["key"] for q in key["questions"]}
    answers: dict[str, dict[str, str]] = {}
    for k, pair in enumerate(pairs, start=1):
        where = f"{path}: pair {k}"
        if not isinstance(pair, dict) or not isinstance(pair.get("id"), str) or pair["id"] not in slots:
            raise UserError(f"{where} is not one of this study's stories")
        if pair["id"] in answers:
            raise UserError(f"{where}: story {pair['id']!r} appears twice")
        shown, given = pair.get("shown"), pair.get("answers")
        if shown not in ([0, 1], [1, 0]) or not isinstance(given, dict):
            raise UserError(f"{where} is damaged (no \"shown\" order or no \"answers\")")
        unknown = [f"{q}={v!r}" for q, v in given.items() if q not in questions or v not in CHOICES + (None,)]
        if unknown:
            raise UserError(f"{where}: unknown answer {unknown[0]}; answers are A, B or tie")
        sides = {"A": slots[pair["id"]][shown[0]], "B": slots[pair["id"]][shown[1]], "tie": "tie"}
        answers[pair["id"]] = {q: sides[v] for q, v in given.items() if v is not None}
    return {"rater": rater, "file": str(path), "answers": answers}


def aggregate(key: dict, raters: list[dict]) -> dict:
    """results.json's content from the unblinded answers of every rater."""
    ids = [p["id"] for p in key["pairs"]]
    names = {m: key["models"][m]["name"] for m in "ab"}
    out = {"format": FORMAT, "study": key["study"], "seed": key.get("seed"),
           "models": [key["models"]["a"], key["models"]["b"]],
           "questions": {}, "agreement": {"fleiss_kappa": {}, "pairs": {}, "undefined": {}}, "raters": []}
    for q in key["questions"]:
        votes = [r["answers"][sid][q["key"]] for r in raters for sid in ids if q["key"] in r["answers"].get(sid, {})]
        n = len(votes)
        row = {"label": q["label"], "text": q["text"], "n": n, "preferences": {}}
        for side in ("a", "b", "tie"):
            count = votes.count(side)
            row["preferences"][names.get(side, side)] = {"count": count, "share": count / n if n else None,
                                                         "ci95": list(stats.wilson(count, n))}
        row["sign_test_p"] = stats.sign_test(votes.count("a"), votes.count("b"))
        out["questions"][q["key"]] = row
        # Fleiss' kappa needs every pair rated by everyone: the pairs some rater skipped are left out.
        items = [[r["answers"][sid][q["key"]] for r in raters] for sid in ids
                 if all(q["key"] in r["answers"].get(sid, {}) for r in raters)]
        kappa = stats.fleiss_kappa(items) if len(raters) > 1 else None
        out["agreement"]["fleiss_kappa"][q["key"]] = kappa
        out["agreement"]["pairs"][q["key"]] = len(items) if len(raters) > 1 else 0
        if kappa is None:
            out["agreement"]["undefined"][q["key"]] = "one rater" if len(raters) < 2 else \
                "no story answered by every rater" if not items else "every judgement the same"
    for r in raters:
        same = total = 0
        for sid, given in r["answers"].items():
            for q, choice in given.items():
                for other in raters:
                    theirs = other["answers"].get(sid, {}).get(q)
                    if other is not r and theirs is not None:
                        same, total = same + (theirs == choice), total + 1
        out["raters"].append({"rater": r["rater"], "file": r["file"],
                              "judgements": sum(len(g) for g in r["answers"].values()),
                              "agreement": same / total if total else None})
    return out


def results(study: Path, files: list[Path], output: Path | None = None) -> tuple[dict, Path]:
    """Read, check, aggregate and write; return the results and the folder they went to."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("rate results draws its plot with matplotlib: pip install 'minigpt5[rate]'") from None
    key, folder = read_key(study)
    output = output or folder
    writable_folder(output, "--output")
    _check_outputs(output)
    raters = [read_answers(path, key) for path in files]
    seen: dict[str, str] = {}
    for r in raters:
        if r["rater"] in seen:
            raise UserError(f"rater {r['rater']!r} is in both {seen[r['rater']]} and {r['file']}; "
                            "give each rater's export once")
        seen[r["rater"]] = r["file"]
    if not any(g for r in raters for g in r["answers"].values()):
        raise UserError("the answers files hold no answers yet")
    report = aggregate(key, raters)
    png = plot(report)
    output.mkdir(parents=True, exist_ok=True)
    write_atomic({output / RESULTS: lambda f: f.write(json.dumps(report, indent=2, ensure_ascii=False)),
                  output / PLOT: png})
    return report, output


def _check_outputs(output: Path) -> None:
    """results.json and preferences.png are replaced only when an earlier `rate results` wrote them."""
    ours = False
    if (output / RESULTS).exists():
        try:
            ours = read_json(output / RESULTS, check_text=False).get("format") == FORMAT
        except (UserError, AttributeError):  # unreadable, too large, not JSON, not an object: not ours
            ours = False
        if not ours:
            raise UserError(f"{output / RESULTS} was not written by rate results; pick another --output")
    if (output / PLOT).exists() and not ours:
        raise UserError(f"{output / PLOT} was not written by rate results; pick another --output")


def _pct(side: dict) -> str:
    if side["share"] is None:
        return "n/a (no judgements)"
    low, high = side["ci95"]
    return f"{side['share']:.1%} [{100 * low:.1f}, {100 * high:.1f}]"


# Why a kappa is undefined, short enough for a cell.
WHY = {"one rater": "one rater", "no story answered by every rater": "no overlap",
       "every judgement the same": "all alike"}


def _model(m: dict) -> str:
    what = ", ".join(f"{k} {m[k]}" for k in ("mode", "model") if m.get(k))
    return escape(f"{m['name']}: {m['option']} {m['path']}" + (f" ({what})" if what else ""))


def table(report: dict) -> Table:
    """One column per question: each model's share and the ties', then the tests."""
    n = len(report["raters"])
    questions = report["questions"]
    # Names, ids and labels are the user's text, printed as it is: never read as rich markup.
    t = Table(title=escape(f"study {report['study']}: {n} rater{'s' * (n != 1)}; share of judgements "
                           "(95% Wilson interval)"),
              caption="\n".join(_model(m) for m in report["models"]))
    t.add_column("preferred")
    for row in questions.values():
        t.add_column(escape(row["label"]), justify="right")
    for name in [m["name"] for m in report["models"]] + ["tie"]:
        t.add_row(escape(name), *(_pct(r["preferences"][name]) for r in questions.values()))
    t.add_row("judgements", *(str(r["n"]) for r in questions.values()))
    t.add_row("sign test p", *(f"{r['sign_test_p']:.3g}" for r in questions.values()))
    kappa, undefined = report["agreement"]["fleiss_kappa"], report["agreement"]["undefined"]
    t.add_row("Fleiss' kappa", *(f"n/a ({WHY[undefined[q]]})" if kappa[q] is None else f"{kappa[q]:.2f}"
                                 for q in questions))
    return t


def rater_table(report: dict) -> Table:
    t = Table()  # agreement: the share of a rater's judgements that match another rater's on the same pair
    for column in ("rater", "judgements", "agrees with others"):
        t.add_column(column, justify="left" if column == "rater" else "right")
    alone = len(report["raters"]) < 2
    for r in report["raters"]:
        agreement = f"{r['agreement']:.1%}" if r["agreement"] is not None else \
            "n/a (one rater)" if alone else "n/a (no overlap)"
        t.add_row(escape(r["rater"]), str(r["judgements"]), agreement)
    return t


def _plain(text: str) -> str:
    """Text drawn as it is: a $ would start matplotlib's math, which can fail to parse."""
    return text.replace("$", r"\$")


def plot(report: dict) -> bytes:
    """Three groups of bars, one per question: the share preferring each model and ties, with intervals."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    rows = list(report["questions"].values())
    sides = [(m["name"], m["name"], colour) for m, colour in zip(report["models"], ("#3366cc", "#dc7633"))] + \
        [("tie", "tie", "#999999")]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    height = 0.26
    for j, (side, name, colour) in enumerate(sides):
        y = [i + (j - 1) * height for i in range(len(rows))]
        share = [100 * (r["preferences"][side]["share"] or 0) for r in rows]
        low = [100 * r["preferences"][side]["ci95"][0] for r in rows]
        high = [100 * r["preferences"][side]["ci95"][1] for r in rows]
        err = [[s - lo for s, lo in zip(share, low)], [hi - s for s, hi in zip(share, high)]]
        ax.barh(y, share, height, xerr=err, color=colour, label=_plain(name), capsize=3, error_kw={"elinewidth": 1})
        for yy, s, hi in zip(y, share, high):
            ax.text(hi + 1.5, yy, f"{s:.1f}%", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [_plain(r["label"]) for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 112)  # room for the labels beyond a whisker at 100
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("judgements preferring (%), with 95% Wilson intervals")
    n = len(report["raters"])
    ax.set_title(_plain(f"study {report['study']}: {n} rater{'s' * (n != 1)}"), fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    return buf.getvalue()
