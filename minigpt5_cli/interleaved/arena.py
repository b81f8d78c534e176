"""OpenING's Interleaved Arena: which models meet on which instance, and their win rates from the judgements.

Pairs (`sample`): per subtask, the models are shuffled into a ring of pairs (each with the next) and dealt
to the subtask's instances in turn from a random offset; each further round gives every instance one more
pair that shares no model with its first and is not already there, either way round. Seeded, unlike
OpenING's sampler; the file is theirs: [{"data_id": total_uid, "model_A": {"id", "name"}, "model_B": ...}],
ids being positions in their baseline_models.json (or in --models).

Scores (`results`), per model over every battle it took part in, as OpenING's calculate_model_winrate.py:
FDT counts Tie(A) and Tie(B) as wins for that side, over all battles; without tie counts only battles
decided A or B; tie 0 is plain wins over all battles; tie 0.5 adds half a win per tie (any winner holding
"Tie"). Judgements are keyed by data_id, A's id and B's id, the last one counting. Agreement with human
labels (`agreement`) is computed as their calculate_agreement.py computes it. Their per-opponent
"without tie" matrix divides by all battles, ties too; that is reproduced only with compat "opening".
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from minigpt5_cli.display import plural
from minigpt5_cli.errors import UserError
from minigpt5_cli.files import json_lines, json_records, read_json, writable_file, write_atomic
from minigpt5_cli.rating import stats

FORMAT = "minigpt5-arena-results"
DATA_FILES = ("test_data.jsonl", "dev_data.jsonl", "stories.jsonl")  # OpenING's own, or prepare-data opening's
METRICS = ("fdt", "without_tie", "tie_zero", "tie_half")
COMPATS = ("opening",)
WINNERS = ("A", "B", "Tie(A)", "Tie(B)", "Tie")  # what their judge's parsing gives, lower case aside


# ---- pairs


def read_instances(data: Path) -> dict[str, list[str]]:
    """{subtask name: [total_uid, ...]} in file order, from OpenING's test or dev JSON Lines, or the stories
    `prepare-data opening` wrote (each keeps its record), or a folder holding one of them."""
    if data.is_dir():
        found = [data / name for name in DATA_FILES if (data / name).is_file()]
        if len(found) != 1:
            raise UserError(f"--data {data} holds {'several' if found else 'none'} of {', '.join(DATA_FILES)}; "
                            "give the file")
        data = found[0]
    elif not data.exists():
        raise UserError(f"--data {data} not found")
    subtasks: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for _, where, record in json_lines(data):
        if isinstance(record, dict) and isinstance(record.get("source"), dict):  # a prepared story
            record = record["source"]
        uid = record.get("total_uid") if isinstance(record, dict) else None
        subtask = record.get("subtask_name") if isinstance(record, dict) else None
        if not isinstance(uid, str) or not uid or not isinstance(subtask, str):
            raise UserError(f"{where} is not an OpenING record (no total_uid or subtask_name)")
        if uid in seen:
            raise UserError(f"{where}: total_uid {uid!r} appears twice")
        seen.add(uid)
        subtasks[subtask].append(uid)
    if not seen:
        raise UserError(f"{data} holds no records")
    return dict(subtasks)


def read_models(names: str | None, baseline: Path | None) -> dict[str, str]:
    """{id: name}: from OpenING's baseline_models.json ([{"0": {"name": ...}}, ...]) and --models picking some of
    them by name; or, without the file, --models numbered from 0 as that file numbers them."""
    picked = [n.strip() for n in names.split(",")] if names is not None else None
    if picked is not None and (not all(picked) or len(set(picked)) != len(picked)):
        raise UserError(f"--models {names!r}: give distinct names, separated by commas")
    if baseline is None:
        if picked is None:
            raise UserError("give --models, or --baseline with OpenING's baseline_models.json")
        known = {str(i): n for i, n in enumerate(picked)}
    else:
        doc = read_json(baseline)
        known = {}
        if isinstance(doc, list) and all(isinstance(entry, dict) for entry in doc):
            known = {k: v.get("name") if isinstance(v, dict) else None for entry in doc for k, v in entry.items()}
        if not known or not all(isinstance(n, str) for n in known.values()):
            raise UserError(f"{baseline} is not OpenING's baseline_models.json (a list of {{id: {{\"name\": ...}}}})")
    if picked is not None:
        ids = {n: k for k, n in known.items()}
        unknown = [n for n in picked if n not in ids]
        if unknown:
            raise UserError(f"--models: {unknown[0]!r} is not in {baseline}; it names {', '.join(known.values())}")
        known = {ids[n]: n for n in picked}
    if len(known) < 2:
        raise UserError("an arena needs at least 2 models")
    return known


def sample(subtasks: dict[str, list[str]], models: dict[str, str], per_instance: int, seed: int) -> list[dict]:
    """The pair file's records: every instance gets `per_instance` pairs, the first rounds' before the later."""
    if per_instance < 1:
        raise UserError("--per-instance must be at least 1")
    others = math.comb(len(models) - 2, 2)  # pairs sharing no model with an instance's first
    if per_instance - 1 > others:
        raise UserError(f"--per-instance {per_instance} needs more models: with {len(models)}, an instance gets "
                        f"at most {plural(others + 1, 'pair')} (after the first, only pairs sharing no model with it)")
    rng = random.Random(seed)
    firsts: list[tuple[str, str, str]] = []
    for uids in subtasks.values():
        ids = list(models)
        rng.shuffle(ids)
        ring = [(a, ids[(i + 1) % len(ids)]) for i, a in enumerate(ids)]
        start = rng.randrange(len(ring))
        firsts += [(uid, *ring[(start + j) % len(ring)]) for j, uid in enumerate(uids)]
    rounds = [firsts]
    used = {(uid, a, b) for uid, a, b in firsts} | {(uid, b, a) for uid, a, b in firsts}
    for _ in range(per_instance - 1):
        more = []
        for uid, a, b in firsts:
            rest = [m for m in models if m not in (a, b)]
            while (pair := (uid, *rng.sample(rest, 2))) in used:
                pass
            used |= {pair, (uid, pair[2], pair[1])}
            more.append(pair)
        rounds.append(more)
    return [{"data_id": uid, "model_A": {"id": a, "name": models[a]}, "model_B": {"id": b, "name": models[b]}}
            for one in rounds for uid, a, b in one]


def write_pairs(pairs: list[dict], output: Path) -> None:
    writable_file(output, "--output")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic({output: lambda f: f.write(json.dumps(pairs, indent=4, ensure_ascii=False) + "\n")})


# ---- results


def check_battle(where: str, r, winner: bool) -> None:
    """Refuse a record that is not a pair (with `winner`, a judgement) of OpenING's files."""
    if not (isinstance(r, dict) and isinstance(r.get("data_id"), (str, int))
            and (not winner or isinstance(r.get("winner"), str))
            and all(isinstance(r.get(s), dict) and "id" in r[s] and isinstance(r[s].get("name"), str)
                    for s in ("model_A", "model_B"))):
        what = "a judgement" if winner else "a pair"
        raise UserError(f"{where} is not {what}: it needs data_id, model_A and model_B (each with id and name)"
                        + (" and winner" if winner else ""))


def key(r: dict) -> str:
    """How OpenING's scripts key a battle: data_id, A's id and B's id."""
    return f"{r['data_id']}_{r['model_A']['id']}_{r['model_B']['id']}"


def read_pairs(path: Path) -> list[dict]:
    """The pairs of a pair file (`sample`'s, or OpenING's data_instance_modelAB.json), each once, in file order."""
    kept: dict[str, dict] = {}
    for where, r in json_records(path, "pairs"):
        check_battle(where, r, winner=False)
        kept.setdefault(key(r), r)
    if not kept:
        raise UserError(f"no pairs in {path}")
    return list(kept.values())


def read_judgements(paths: list[Path]) -> list[dict]:
    """The judgements of every file (a JSON list, or JSON Lines when named .jsonl), one per data_id, A id and
    B id: the last one read."""
    kept: dict[str, dict] = {}
    for path in paths:
        for where, r in json_records(path, "judgements"):
            check_battle(where, r, winner=True)
            kept[key(r)] = r
    if not kept:
        raise UserError(f"no judgements in {', '.join(map(str, paths))}")
    return list(kept.values())


class Tally:
    """One model's battles (overall, or against one opponent) and how they went."""

    def __init__(self) -> None:
        self.battles = self.wins = self.fdt_wins = self.ties = self.decided = 0

    def add(self, side: str, winner: str) -> None:
        self.battles += 1
        self.wins += winner == side
        self.fdt_wins += winner in (side, f"Tie({side})")
        self.ties += "Tie" in winner
        self.decided += winner in ("A", "B")

    def report(self, opening: bool = False) -> dict:
        """The four rates with 95% Wilson intervals; `opening`: without tie over all battles, as their matrix."""
        n, decided = self.battles, self.battles if opening else self.decided
        out = {"battles": n, "decided": self.decided, "wins": self.wins, "ties": self.ties}
        for name, k, of in (("fdt", self.fdt_wins, n), ("without_tie", self.wins, decided),
                            ("tie_zero", self.wins, n), ("tie_half", self.wins + self.ties / 2, n)):
            out[name] = k / of if of else None
            out[f"{name}_ci95"] = list(stats.wilson(k, of))
        return out


def aggregate(judgements: list[dict], compat: str | None = None) -> dict:
    """results.json's content: per model (by name) its rates overall and against each opponent, best FDT first."""
    overall: dict[str, Tally] = defaultdict(Tally)
    pairs: dict[str, dict[str, Tally]] = defaultdict(lambda: defaultdict(Tally))
    for r in judgements:
        a, b, winner = r["model_A"]["name"], r["model_B"]["name"], r["winner"]
        for side, me, them in (("A", a, b), ("B", b, a)):
            overall[me].add(side, winner)
            pairs[me][them].add(side, winner)
    models = {}
    for name, tally in overall.items():
        models[name] = {**tally.report(), "opponents": {o: t.report(compat == "opening")
                                                        for o, t in sorted(pairs[name].items())}}
    models = dict(sorted(models.items(), key=lambda m: -m[1]["fdt"]))
    # Any other winner (their parsing leaves "tie(a)" as it is) is a battle without a win, a tie if it holds "Tie".
    other = sum(r["winner"] not in WINNERS for r in judgements)
    return {"format": FORMAT, "compat": compat, "battles": len(judgements), "other_winners": other,
            "models": models}


def differences(report: dict) -> int:
    """How many per-opponent without-tie rates differ between the two definitions: wins over decided battles
    (none: no rate), and OpenING's wins over all battles."""
    return sum(o["decided"] != o["battles"] and (o["wins"] > 0 or not o["decided"])
               for m in report["models"].values() for o in m["opponents"].values())


def _tie(winner: str) -> str:
    return "Tie" if "tie" in winner.lower() else winner


def _forced(winner: str) -> str:
    return {"Tie(A)": "A", "Tie(B)": "B", "Tie": "A"}.get(winner, winner)


def agreement(human: list[dict], judged: list[dict]) -> dict:
    """How often the judge's winners match the human ones on the battles both hold (keyed by data_id and the
    two models' names; a judge's last one counting; every human label counting, several raters' included), as
    OpenING's calculate_agreement.py: with tie (any winner holding "tie", in any case, is a tie), without tie
    (battles either side called a tie left out) and FDT (Tie(A) is A, Tie(B) is B, a plain Tie is A).
    Fractions, with 95% Wilson intervals."""
    def named(r: dict) -> str:
        return f"{r['data_id']}_{r['model_A']['name']}_{r['model_B']['name']}"

    judge = {named(r): r["winner"] for r in judged}
    both = [(h["winner"], judge[named(h)]) for h in human if named(h) in judge]
    out = {}
    for name, same in (("with_tie", _tie), ("without_tie", _tie), ("fdt", _forced)):
        pairs = [(same(h), same(j)) for h, j in both]
        if name == "without_tie":
            pairs = [(h, j) for h, j in pairs if "Tie" not in (h, j)]
        agreed = sum(h == j for h, j in pairs)
        out[name] = {"agreement": agreed / len(pairs) if pairs else None, "agreed": agreed, "battles": len(pairs),
                     "ci95": list(stats.wilson(agreed, len(pairs)))}
    return out


def rated(study: Path, answers: list[Path], question: str, judged: list[dict]) -> list[dict]:
    """Human labels from a rating study (`rate build`: two models over the same stories) and its raters' answer
    files: for every judged battle between the study's two models (by name) on one of its stories (by
    data_id), each rater's answer to `question` as the battle's A, B or Tie."""
    from minigpt5_cli.rating.build import read_key
    from minigpt5_cli.rating.results import read_answers

    study_key, _ = read_key(study)
    asked = [q["key"] for q in study_key["questions"]]
    if question not in asked:
        raise UserError(f"--question {question!r}: the study asks {', '.join(asked)}")
    names = {m: study_key["models"][m]["name"] for m in "ab"}
    battles = [r for r in judged if {r["model_A"]["name"], r["model_B"]["name"]} == set(names.values())]
    labels = []
    for path in answers:
        given = read_answers(path, study_key)["answers"]
        for r in battles:
            choice = given.get(str(r["data_id"]), {}).get(question)
            if choice is not None:
                side = {r["model_A"]["name"]: "A", r["model_B"]["name"]: "B"}
                labels.append({**r, "winner": side.get(names.get(choice), "Tie")})
    if not labels:
        raise UserError(f"no judged battle was rated in {study}: it compares {names['a']!r} and {names['b']!r}; the "
                        "judgements must name them so, with data_ids that are the study's story ids")
    return labels


def write_results(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic({output: lambda f: f.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")})


def agreement_line(found: dict) -> str:
    said = [f"{label} {found[k]['agreement']:.2%} of {found[k]['battles']}" if found[k]["battles"] else
            f"{label} n/a (no battles)" for label, k in (("with tie", "with_tie"), ("without tie", "without_tie"),
                                                           ("FDT", "fdt"))]
    return f"agreement with {', '.join(found['human'])}: " + ", ".join(said)


def _pct(row: dict, metric: str) -> str:
    if row[metric] is None:
        return "n/a"
    low, high = row[f"{metric}_ci95"]
    return f"{row[metric]:.2%} [{100 * low:.1f}, {100 * high:.1f}]"


def table(report: dict) -> Table:
    t = Table(title=f"OpenING arena: {report['battles']} battles; win rate (95% Wilson interval)")
    for column in ("model", "battles", "FDT", "w/o tie", "tie 0", "tie .5"):
        t.add_column(column, justify="left" if column == "model" else "right")
    for name, row in report["models"].items():
        t.add_row(escape(name), str(row["battles"]), *(_pct(row, m) for m in METRICS))
    return t
