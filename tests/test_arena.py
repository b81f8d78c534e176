"""OpenING's Interleaved Arena: `arena sample` (their pair file, seeded) and `arena results` (their four win rates,
and a judge's agreement with human labels).

The oracle tests run OpenING's own scripts from a checkout named by MINIGPT5_ORACLE_OPENING (skipped without it):
its shipped judgements give the paper's numbers and agreement, and random tournaments give the same rates
through their calculate_model_winrate.py, and the same agreement through their calculate_agreement.py, as ours.
"""

import contextlib
import csv
import importlib.util
import io
import json
import os
import random
from pathlib import Path

import pytest

from conftest import run_cli
from minigpt5_cli.interleaved import arena
from minigpt5_cli.rating import stats

ORACLE = os.environ.get("MINIGPT5_ORACLE_OPENING")
GOLDEN = Path(ORACLE or ".") / "Interleaved_Arena" / "intjudge_rag-judge_modelAB_results.json"
needs_oracle = pytest.mark.skipif(not ORACLE, reason="MINIGPT5_ORACLE_OPENING names no OpenING checkout")


def battle(data_id, a, b, winner, ids="XYZ"):
    return {"data_id": data_id, "model_A": {"id": str(ids.index(a)), "name": a},
            "model_B": {"id": str(ids.index(b)), "name": b}, "winner": winner}


# The hand-made tournament: (A, B, winner) per battle, each on its own instance.
HAND = [battle(str(i), *t) for i, t in enumerate([("X", "Y", "A"), ("X", "Y", "Tie(A)"), ("Y", "X", "Tie(A)"),
                                                   ("X", "Z", "B"), ("Z", "Y", "Tie(B)"), ("Y", "Z", "A")])]


def pct(x):
    return round(100 * x, 2)


def test_hand_made_tournament(tmp_path, capsys):
    (tmp_path / "j.json").write_text(json.dumps(HAND))
    assert run_cli("arena", "results", str(tmp_path / "j.json"), "-o", str(tmp_path / "r.json")) == 0
    assert "2 per-opponent without-tie rates differ" in capsys.readouterr().err
    models = json.loads((tmp_path / "r.json").read_text())["models"]
    assert list(models) == ["Y", "X", "Z"]  # best FDT first
    assert {m: pct(r["fdt"]) for m, r in models.items()} == {"Y": 60, "X": 50, "Z": 33.33}
    assert {m: pct(r["without_tie"]) for m, r in models.items()} == {"Y": 50, "X": 50, "Z": 50}
    assert {m: pct(r["tie_zero"]) for m, r in models.items()} == {"Y": 20, "X": 25, "Z": 33.33}
    assert {m: pct(r["tie_half"]) for m, r in models.items()} == {"Y": 50, "X": 50, "Z": 50}
    assert models["X"]["battles"] == 4 and models["X"]["fdt_ci95"] == list(stats.wilson(2, 4))
    x_y = models["X"]["opponents"]["Y"]
    assert (x_y["battles"], x_y["wins"], x_y["ties"]) == (3, 1, 2)
    assert x_y["without_tie"] == 1.0  # decided battles only: the one X won
    assert pct(x_y["fdt"]) == 66.67 and pct(x_y["tie_half"]) == 66.67
    assert pct(arena.aggregate(HAND, "opening")["models"]["X"]["opponents"]["Y"]["without_tie"]) == 33.33
    assert arena.aggregate(HAND, "opening")["models"]["X"]["without_tie"] == 0.5  # overall: the same either way


def test_the_last_judgement_of_a_pair_counts_and_jsonl_reads(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(HAND[:1]))
    again = {**HAND[0], "winner": "B", "raw": "B is better"}
    (tmp_path / "b.jsonl").write_text(json.dumps(again) + "\n\n" + json.dumps(HAND[1]) + "\n")
    judged = arena.read_judgements([tmp_path / "a.json", tmp_path / "b.jsonl"])
    assert [j["winner"] for j in judged] == ["B", "Tie(A)"]
    report = arena.aggregate(judged + [battle("9", "X", "Y", "tie(a)")])
    assert report["battles"] == 3 and report["other_winners"] == 1
    x = report["models"]["X"]
    assert (x["battles"], x["wins"], x["ties"]) == (3, 0, 1)  # "tie(a)", as their parser leaves it: no win, no tie
    assert x["without_tie"] == 0.0 and pct(x["fdt"]) == 33.33


def test_wilson_with_halves():
    low, high = stats.wilson(2.5, 10)
    assert stats.wilson(2, 10)[0] < low < stats.wilson(3, 10)[0] < 0.25 < high < stats.wilson(3, 10)[1]
    assert stats.wilson(3.0, 10) == stats.wilson(3, 10)


def opening_file(path: Path, sizes: dict[str, int]) -> Path:
    lines = [{"total_uid": f"{s:02}{k:03}", "subtask_name": name, "data_id": str(k), "conversations": []}
             for s, (name, n) in enumerate(sizes.items()) for k in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_sample_is_seeded_and_fair(tmp_path):
    data = opening_file(tmp_path / "test_data.jsonl", {"Story Writing": 12, "Recipe": 5, "Travel": 7})
    names = ["m0", "m1", "m2", "m3", "m4"]

    def pairs(seed, name):
        out = tmp_path / name
        assert run_cli("arena", "sample", "--data", str(data), "--models", ",".join(names), "--per-instance", "3",
                       "--seed", str(seed), "-o", str(out)) == 0
        return out

    first, again, other = pairs(1, "a.json"), pairs(1, "b.json"), pairs(2, "c.json")
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    drawn = json.loads(first.read_text())
    assert len(drawn) == 3 * 24
    by_instance = {}
    for p in drawn:
        a, b = p["model_A"], p["model_B"]
        assert a["name"] == names[int(a["id"])] and b["name"] == names[int(b["id"])]
        assert a["id"] != b["id"]
        by_instance.setdefault(p["data_id"], []).append({a["id"], b["id"]})
    assert len(by_instance) == 24 and all(len(v) == 3 for v in by_instance.values())
    for first_pair, *more in by_instance.values():
        assert all(not (first_pair & p) for p in more)  # later pairs share no model with the first
        assert len({frozenset(p) for p in more}) == len(more)  # and none twice, either way round
    ring = {frozenset((p["model_A"]["id"], p["model_B"]["id"])) for p in drawn[:12]}  # first round, 12 instances
    assert len(ring) == 5 and {m for pair in ring for m in pair} == {"0", "1", "2", "3", "4"}


def test_sample_from_a_folder_with_their_model_list(tmp_path):
    opening_file(tmp_path / "dev_data.jsonl", {"Recipe": 4})
    (tmp_path / "baseline_models.json").write_text(json.dumps(
        [{str(i): {"name": n, "github": ""}} for i, n in enumerate(["Show-o", "SEED-X", "gill", "MiniGPT-5"])]))
    out = tmp_path / "pairs.json"
    assert run_cli("arena", "sample", "--data", str(tmp_path), "--baseline", str(tmp_path / "baseline_models.json"),
                   "--models", "gill,MiniGPT-5", "--per-instance", "1", "-o", str(out)) == 0
    drawn = json.loads(out.read_text())
    assert [p["data_id"] for p in drawn] == ["00000", "00001", "00002", "00003"]
    assert {(p["model_A"]["id"], p["model_A"]["name"]) for p in drawn} == {("2", "gill"), ("3", "MiniGPT-5")}


@needs_oracle
def test_golden_numbers_from_their_judgements(tmp_path):
    if not GOLDEN.is_file():
        pytest.skip(f"{GOLDEN} is not in the checkout")
    ids = {k: v["name"] for entry in json.loads((GOLDEN.parent / "baseline_models.json").read_text())
           for k, v in entry.items()}
    report = arena.aggregate(arena.read_judgements([GOLDEN]))
    assert report["battles"] == 4303
    expected = {"4": (24.37, 15.29, 9.80, 27.76), "5": (84.95, 86.84, 72.09, 80.58), "10": (87.44, 91.48, 75.46, 84.22)}
    for model_id, rates in expected.items():
        row = report["models"][ids[model_id]]
        assert tuple(pct(row[m]) for m in arena.METRICS) == rates, ids[model_id]



@needs_oracle
def test_golden_agreement_of_their_judge_with_their_raters():
    human = GOLDEN.parent / "judge_modelAB_results.json"
    if not GOLDEN.is_file() or not human.is_file():
        pytest.skip(f"{GOLDEN} or {human} is not in the checkout")
    found = arena.agreement(arena.read_judgements([human]), arena.read_judgements([GOLDEN]))
    assert {k: (pct(v["agreement"]), v["battles"]) for k, v in found.items()} == {
        "with_tie": (66.45, 4301), "without_tie": (91.11, 2362), "fdt": (82.42, 4301)}

def their_script(name: str):
    """One of OpenING's scripts from the checkout, imported (their scripts guard their main part)."""
    spec = importlib.util.spec_from_file_location(f"opening_{Path(name).stem}", Path(ORACLE) / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def their_rates(module, results, folder: Path) -> tuple[list[dict], list[dict]]:
    """Each of their four functions' printed rates {name: "12.34%"} and CSV matrix {(row, column): cell}."""
    printed, matrices = [], []
    for function, name in (("tie2ABdiv", "model_win_rates"), ("without_tie", "model_win_rates_notie"),
                           ("with_tie", "model_win_rates_withtie0"), ("with_tie_equaldiv", "model_win_rates_withtie05")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            getattr(module, function)(results)
        printed.append(dict(line.rsplit(": ", 1) for line in out.getvalue().splitlines()[1:]))
        with open(folder / "Interleaved_Arena" / f"{name}.csv", newline="") as f:
            matrices.append({(row["Model"], col): cell for row in csv.DictReader(f) for col, cell in row.items()
                             if col != "Model" and col != row["Model"]})
    return printed, matrices


@needs_oracle
def test_random_tournaments_against_their_script(tmp_path, monkeypatch):
    theirs = their_script("calculate_model_winrate.py")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Interleaved_Arena").mkdir()
    rng = random.Random(0)
    names = ["Show-o", "gill", "MiniGPT-5", "Human", "Emu2", "anole"]
    for t in range(200):
        models = names[:rng.randint(2, 6)]
        judged = [battle(str(rng.randrange(8)), *rng.sample(models, 2), ids=names,
                         winner=rng.choice(["A", "B", "Tie(A)", "Tie(B)", "Tie", "tie(a)"]))
                  for _ in range(rng.randint(1, 40))]
        path = tmp_path / "j.json"
        path.write_text(json.dumps(judged))
        results, _ = theirs.decode_complied_results(theirs.load_evaluation_results(str(path)))
        printed, matrices = their_rates(theirs, results, tmp_path)
        for compat in (None, "opening"):
            report = arena.aggregate(arena.read_judgements([path]), compat)
            ours = report["models"]
            for metric, rates, matrix in zip(arena.METRICS, printed, matrices):
                mine = {m: f"{r[metric]:.2%}" for m, r in ours.items() if r[metric] is not None}
                assert mine == rates, (t, metric)
                cells = {(m, o): f"{r[metric]:.2%}" for m, row in ours.items()
                         for o, r in row["opponents"].items() if r[metric] is not None}
                mine = {k: cells.get(k, "N/A") for k in matrix}
                if metric == "without_tie" and compat is None:  # ours: decided battles only; the same without ties
                    same = {k for k in matrix if k[1] not in ours[k[0]]["opponents"] or
                            ours[k[0]]["opponents"][k[1]]["decided"] == ours[k[0]]["opponents"][k[1]]["battles"]}
                    assert {k: mine[k] for k in same} == {k: matrix[k] for k in same}, (t, metric)
                    differ = sum(mine[k] != matrix[k] for k in matrix)
                    assert arena.differences(report) >= differ, t  # their matrix leaves out models with no decided battle
                else:
                    assert mine == matrix, (t, metric, compat)


def test_agreement_with_human_labels(tmp_path, capsys):
    human = [battle("1", "X", "Y", "A"), battle("2", "X", "Y", "Tie(A)"), battle("3", "Y", "Z", "B"),
             battle("4", "X", "Z", "Tie"), battle("5", "Y", "X", "tie(b)"), battle("6", "X", "Y", "B")]
    judged = [battle("1", "X", "Y", "A"), battle("2", "X", "Y", "Tie(B)"), battle("3", "Y", "Z", "Tie(B)"),
              battle("4", "X", "Z", "A"), battle("5", "Y", "X", "B"), battle("7", "X", "Y", "A")]
    (tmp_path / "h.json").write_text(json.dumps(human))
    (tmp_path / "j.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judged))
    assert run_cli("arena", "results", str(tmp_path / "j.jsonl"), "--human", str(tmp_path / "h.json"),
                   "-o", str(tmp_path / "r.json")) == 0
    assert "with tie 40.00% of 5, without tie 100.00% of 1, FDT 60.00% of 5" in capsys.readouterr().out
    found = json.loads((tmp_path / "r.json").read_text())["agreement"]
    assert (found["human"], found["study"]) == ([str(tmp_path / "h.json")], None)
    assert {k: (v["agreed"], v["battles"]) for k, v in found.items() if isinstance(v, dict)} == {
        "with_tie": (2, 5), "without_tie": (1, 1), "fdt": (3, 5)}
    assert found["fdt"]["agreement"] == 0.6 and found["fdt"]["ci95"] == list(stats.wilson(3, 5))
    assert arena.agreement(human[:1], judged[1:])["with_tie"]["agreement"] is None  # no battle in common



def test_agreement_with_a_rating_study(tmp_path, capsys):
    """Two raters' answers on a rate build page over models X and Y, unblinded by its key: each answer to
    the question asked is one human label, turned to the side each judged battle put the model on."""
    from test_rating import export, text_outputs

    x, y = text_outputs(tmp_path, ["1", "2", "3"])
    x, y = x.rename(tmp_path / "X"), y.rename(tmp_path / "Y")
    assert run_cli("rate", "build", "--a", str(x), "--b", str(y), "-o", str(tmp_path / "study"), "--seed", "1") == 0
    key = json.loads((tmp_path / "study" / "key.json").read_text())
    for rater, choices in (("r1", "atb"), ("r2", "bat")):  # a: X, b: Y, t: tie; stories 1, 2, 3
        answers = {sid: {"together": {"t": "tie"}.get(c, c), "language": "a"} for sid, c in zip("123", choices)}
        (tmp_path / f"{rater}.json").write_text(json.dumps(export(key, rater, answers)))
    judged = [battle("1", "X", "Y", "A"), battle("2", "Y", "X", "Tie(B)"), battle("3", "X", "Y", "B"),
              battle("4", "X", "Y", "A"), battle("1", "X", "Z", "B")]  # not rated: another story, another model
    (tmp_path / "j.json").write_text(json.dumps(judged))
    argv = ["arena", "results", str(tmp_path / "j.json"), "--study", str(tmp_path / "study"), "--human",
            str(tmp_path / "r1.json"), "--human", str(tmp_path / "r2.json"), "-o", str(tmp_path / "r.json")]
    assert run_cli(*argv) == 0
    assert "with tie 50.00% of 6, without tie 66.67% of 3, FDT 50.00% of 6" in capsys.readouterr().out
    found = json.loads((tmp_path / "r.json").read_text())["agreement"]
    assert (found["study"], found["question"]) == (str(tmp_path / "study"), "together")
    assert run_cli(*argv, "--question", "language") == 0  # always X: A in battles 1 and 3, B in 2
    assert "with tie 33.33% of 6, without tie 50.00% of 4, FDT 66.67% of 6" in capsys.readouterr().out

@needs_oracle
def test_agreement_against_their_script(tmp_path):
    theirs = their_script("calculate_agreement.py")
    rng = random.Random(0)
    names = ["Show-o", "gill", "MiniGPT-5", "Human", "Emu2", "anole"]
    winners = ["A", "B", "Tie(A)", "Tie(B)", "Tie", "tie(a)"]
    for t in range(500):
        def draw():
            return [battle(str(rng.randrange(6)), *rng.sample(names[:4], 2), ids=names, winner=rng.choice(winners))
                    for _ in range(rng.randint(1, 30))]
        human, judged = draw(), draw()
        (tmp_path / "h.json").write_text(json.dumps(human))
        (tmp_path / "j.json").write_text(json.dumps(judged))
        ours = arena.agreement(*(arena.read_judgements([tmp_path / n]) for n in ("h.json", "j.json")))
        people, judge = (theirs.load_evaluation_results(str(tmp_path / n)) for n in ("h.json", "j.json"))
        for name, function in (("with_tie", "calculate_agreement_with_tie"),
                               ("without_tie", "calculate_agreement_without_tie"),
                               ("fdt", "calculate_agreement_force_divide")):
            percent, total = getattr(theirs, function)(people, judge)
            assert (ours[name]["battles"], round(100 * (ours[name]["agreement"] or 0), 9)) == \
                (total, round(percent, 9)), (t, name)
