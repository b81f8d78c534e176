"""MMIE: `judge --benchmark mmie` against a small OpenAI-compatible server started here on 127.0.0.1, its
prompt built as MMIE's dataset.py and prompts.py build it, and `scores --benchmark mmie` (AVG, SA, PBL, MSR).

The rubrics are a stand-in prompts.py with MMIE's names and texts of our own. The oracle tests load MMIE's
get_dataset and, pulled out of main.py with `ast` (importing it loads the judge), find_score and average,
from a checkout named by MINIGPT5_ORACLE_MMIE (skipped without it).
"""

import ast
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

from conftest import run_cli
from minigpt5_cli.errors import UserError
from minigpt5_cli.interleaved import mmie, scores
from minigpt5_cli.interleaved.scores_cli import scores as scores_command
from test_isg import Server, no_proxy, png  # noqa: F401 (no_proxy: a fixture used by every test)

ORACLE = os.environ.get("MINIGPT5_ORACLE_MMIE")
needs_oracle = pytest.mark.skipif(not ORACLE, reason="MINIGPT5_ORACLE_MMIE names no MMIE checkout")

STAND_IN = '''raise SystemExit("the prompt file must be read, not run")
SA_SYSTEM_PROMPT = "SA rubric. "
PBL_SYSTEM_PROMPT = "PBL rubric. "
MSR_PROMPT = "MSR rubric. "


def get_prompt(data_id):
    if "SA" in data_id:
        return SA_SYSTEM_PROMPT + "Q:{question}|A:{answer}|"
    elif "PBL" in data_id:
        return PBL_SYSTEM_PROMPT + "Q:{question}|A:{answer}|"
    elif "MSR" in data_id:
        return MSR_PROMPT + "Q:{question}|A:{answer}|GT:{gt_answer}|"
'''

# find_score: the reference note's table, and more; (text, score read, counted)
SCORES = [
    ("### Score\n4.5", 4, True),
    ("### Score: 2.5", 2, True),
    ("Score 3", None, False),
    ("### Score\n7", 7, False),
    ("### Score\n-1", -1, False),
    ("### Feedback\nfine, 9 of 10 steps\n### Score\n5", 5, True),
    ("### Score\nthree point five: 3.5", 4, True),
    ("### Score 6.0", 6, True),
    ("### Score\n0", 0, True),
    ("### Feedback\n### Score", None, False),
]


@pytest.mark.parametrize("text, score, counted", SCORES)
def test_find_score(text, score, counted):
    assert mmie.find_score(text) == score
    assert mmie.valid(mmie.find_score(text)) == counted


def test_score_too_long_is_none():
    """A number of 400 digits reads as inf: no score (MMIE's script fails on it)."""
    assert mmie.find_score("### Score " + "9" * 400) is None and mmie.find_score("### Score " + "9" * 300) == int(
        float("9" * 300))


def block(text=None, image=None):
    return {"text": text, "image": image}


def sample(sid, question, answer, gt="42"):
    return {"id": sid, "question": question, "answer": answer, "model": "m", "gt_answer": [block(gt)]}


@pytest.fixture
def bench(tmp_path):
    """MMIE's stand-in checkout, a prepared folder with question images and an export with answer images."""
    data, exp, checkout = tmp_path / "data", tmp_path / "exp", tmp_path / "MMIE"
    for k in range(5):
        png(data / "images" / f"q{k}.png")
        png(exp / "m_images" / f"a{k}.png")
    checkout.mkdir()
    (checkout / "prompts.py").write_text(STAND_IN)
    samples = [
        sample("SA_1", [block("Tell a story."), block(None, "images/q0.png")],
               [block("Once.", "m_images/a0.png"), block("Then.", "m_images/a1.png"), block("After.", "m_images/a2.png"),
                block("The end.")]),
        sample("PBL_2", [block("How?")], "Like this."),
        sample("MSR_3", [block("1+1?", "images/q1.png")], [block("2")], gt="2"),
        sample("SA_4", [block(f"q{k}", f"images/q{k}.png") for k in range(5)], [block("A story.")]),
    ]
    (exp / "m.json").write_text(json.dumps(samples))
    return tmp_path


def judge_args(tmp, url, *extra):
    return ["judge", "--benchmark", "mmie", "--api", url, "--judge", "MMIE-Score", "--exports", str(tmp / "exp"),
            "--data", str(tmp / "data"), "--prompts", str(tmp / "MMIE"), "--output", str(tmp / "j.jsonl"), *extra]


def feedback(text):
    return 200, "### Feedback\nok\n### Score\n" + {"SA": "4.5", "PB": "3", "MS": "7"}[text[:2]]


def read(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_judge_end_to_end(bench, capsys):
    """The prompt as MMIE builds it, with its images in order; the score read; a rerun asks nothing; then the
    scores: SA 4 (4.5 rounds to even) twice, PBL 3, MSR 7 left out."""
    server = Server(feedback)
    try:
        assert run_cli(*judge_args(bench, server.url)) == 0
        lines = read(bench / "j.jsonl")
        assert set(lines) == {"SA_1", "PBL_2", "MSR_3", "SA_4"}
        sa = lines["SA_1"]
        assert sa["question"] == "Tell a story.\nImage-0: <image>\n"
        assert sa["answer"] == ("Once.\nImage-1: <image>\nThen.\nImage-2: <image>\nAfter.\nImage-3: <image>\n"
                                "The end.\n")
        assert sa["score"] == 4 and sa["gpt_feedback"].endswith("4.5") and sa["judge"] == "MMIE-Score"
        sent = {r["body"]["messages"][0]["content"][0]["text"]: r["body"] for r in server.requests}
        prompt = "SA rubric. Q:" + sa["question"] + "|A:" + sa["answer"] + "|"
        parts = sent[prompt]["messages"][0]["content"]
        assert [p["type"] for p in parts] == ["text"] + ["image_url"] * 4
        assert "response_format" not in sent[prompt] and sent[prompt]["max_tokens"] == 1024
        assert "MSR rubric. Q:1+1?\nImage-0: <image>\n|A:2\n|GT:2|" in sent
        assert "PBL rubric. Q:How?\n|A:Like this.\n|" in sent
        err = capsys.readouterr().err
        assert "answers judged whole (MMIE's script stops them after the third image): 1" in err
        assert "samples with more than 4 images judged (MMIE's script leaves them out): 1" in err
        assert run_cli(*judge_args(bench, server.url)) == 0
        assert len(server.requests) == 4
    finally:
        server.close()
    scores_command(judgements=[bench / "j.jsonl"], benchmark="mmie", output=bench / "s.json", compat=None)
    report = json.loads((bench / "s.json").read_text())
    assert report["models"]["m"] == {"avg": 3.667, "sa": 4.0, "pbl": 3.0, "msr": None, "samples": 4, "scored": 3}
    assert "3.667" in capsys.readouterr().out


def test_judge_compat(bench, capsys):
    """--compat mmie: the answer stops after the third image overall, the five-image sample is left out."""
    server = Server(feedback)
    try:
        assert run_cli(*judge_args(bench, server.url, "--compat", "mmie")) == 0
    finally:
        server.close()
    lines = read(bench / "j.jsonl")
    assert set(lines) == {"SA_1", "PBL_2", "MSR_3"}
    assert lines["SA_1"]["answer"] == "Once.\nImage-1: <image>\nThen.\nImage-2: <image>\n"
    assert len(lines["SA_1"]["images"]) == 3
    err = capsys.readouterr().err
    assert "answers stopped after the third image, as MMIE's script does: 1" in err
    assert "samples with more than 4 images left out, as MMIE's script does: 1" in err


def test_missing_image(bench):
    """A missing image is refused by default (before any request), skipped in compat as MMIE skips it."""
    (bench / "exp" / "m_images" / "a1.png").unlink()
    server = Server(feedback)
    try:
        assert run_cli(*judge_args(bench, server.url)) == 2
        assert not server.requests
        assert run_cli(*judge_args(bench, server.url, "--compat", "mmie")) == 0
    finally:
        server.close()
    assert read(bench / "j.jsonl")["SA_1"]["answer"] == ("Once.\nImage-1: <image>\nThen.\nAfter.\n"
                                                           "Image-2: <image>\n")


def test_resume_after_a_kill_and_foreign_output(bench, capsys):
    """A last line cut short by a kill is removed and that sample judged again; a whole last line without its
    newline kept; an --output that holds MMIE samples, not judgements, refused and left as it is."""
    server = Server(feedback)
    try:
        assert run_cli(*judge_args(bench, server.url)) == 0
        whole = (bench / "j.jsonl").read_text().splitlines(keepends=True)
        (bench / "j.jsonl").write_text("".join(whole[:2] + whole[3:]) + whole[2][:30])
        assert run_cli(*judge_args(bench, server.url)) == 0
        assert len(server.requests) == 5 and len(read(bench / "j.jsonl")) == 4
        (bench / "j.jsonl").write_text("".join(whole).rstrip("\n"))
        assert run_cli(*judge_args(bench, server.url)) == 0
        assert len(server.requests) == 5 and (bench / "j.jsonl").read_text() == "".join(whole)
        foreign = "".join(json.dumps(s) + "\n" for s in json.loads((bench / "exp" / "m.json").read_text()))
        (bench / "j.jsonl").write_text(foreign)
        capsys.readouterr()
        assert run_cli(*judge_args(bench, server.url)) == 2
        assert f"{bench / 'j.jsonl'} is not a judgement file of MMIE; give another --output" in capsys.readouterr().err
        assert (bench / "j.jsonl").read_text() == foreign and len(server.requests) == 5
    finally:
        server.close()


def test_rubrics_are_read_not_run(tmp_path):
    (tmp_path / "prompts.py").write_text(STAND_IN)
    assert mmie.load_prompts(tmp_path)["MSR"] == "MSR rubric. Q:{question}|A:{answer}|GT:{gt_answer}|"
    (tmp_path / "prompts.py").write_text(STAND_IN.replace('elif "PBL"', 'elif "XYZ"'))
    with pytest.raises(UserError, match="lacks the PBL rubric"):
        mmie.load_prompts(tmp_path)


def test_scores_of_mmie_output(tmp_path):
    """MMIE's main.py output (a JSON list with gpt_feedback, its model per sample) scores as its main.py
    reports: valid scores only, the task by the id's substring, SA first."""
    out = [{"id": i, "model": "gt", "gpt_feedback": f} for i, f in [
        ("SA_1", "### Score\n5"), ("SA_PBL_2", "### Score\n2"), ("PBL_3", "### Score\n2.5"), ("MSR_4", "### Score 9"),
        ("MSR_5", "no score"), ("MSR_6", "### Score\n1")]]
    path = tmp_path / "eval_result.json"
    path.write_text(json.dumps(out))
    assert scores.compute("mmie", [path], None)["models"] == {
        "gt": {"avg": 2.5, "sa": 3.5, "pbl": 2.0, "msr": 1.0, "samples": 6, "scored": 4}}


def random_sample(rng, sid):
    def blocks(n, images):
        return [block(rng.choice([None, "", "t", "two\nlines"]), rng.choice([None, *images])) for _ in range(n)]

    answer = rng.choice(["an answer", blocks(rng.randrange(6), ["answer/a.png", "answer/none.png"])])
    return sample(sid, blocks(rng.randrange(7), ["q.png", "missing.png"]), answer, rng.choice(["x", None]))


@needs_oracle
def test_get_dataset_oracle(tmp_path):
    """500 random samples (texts and images anywhere, missing images, string answers) through MMIE's own
    get_dataset equal ours in compat: texts, images, left out when it leaves them out."""
    spec = importlib.util.spec_from_file_location("mmie_dataset", Path(ORACLE) / "dataset.py")
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    png(tmp_path / "q.png"), png(tmp_path / "answer" / "a.png")
    rng = random.Random(0)
    records = [random_sample(rng, f"SA_{i}") for i in range(500)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    expected = {d["id"]: d for d in theirs.get_dataset(str(tmp_path), "data.json")}
    kept = 0
    for r in records:
        got = mmie.build(r, tmp_path, tmp_path, True, [])
        if len(got["images"]) > mmie.MAX_IMAGES:
            assert r["id"] not in expected
            continue
        kept += 1
        assert {**got, "images": [str(p) for p in got["images"]]} == expected[r["id"]]
    assert kept == len(expected) and 0 < kept < 500


def pulled(path: Path, names: set[str]) -> dict:
    """The named functions of a module, taken out with ast and run alone, with what they import."""
    tree = ast.parse(path.read_text())
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names], [])
    scope = {"re": __import__("re"), "np": __import__("numpy")}
    exec(compile(module, str(path), "exec"), scope)
    return scope


@needs_oracle
def test_find_score_and_average_oracle():
    theirs = pulled(Path(ORACLE) / "main.py", {"find_score", "average"})
    rng = random.Random(0)
    for text, _, _ in SCORES:
        assert mmie.find_score(text) == theirs["find_score"](text)
    for _ in range(500):
        text = rng.choice(["### Score", "### Score:", "Score", ""]) + rng.choice([" ", "\n", "\n### x "]) + str(
            rng.choice([rng.randrange(-3, 10), round(rng.uniform(-2, 8), rng.randrange(3))]))
        assert mmie.find_score(text) == theirs["find_score"](text), text
        values = [rng.randrange(7) for _ in range(rng.randrange(12))]
        assert scores.average(values) == theirs["average"](values)
