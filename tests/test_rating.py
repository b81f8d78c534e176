import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from minigpt5_cli.rating import stats

from conftest import run_cli

MARKUP = "A <script>document.title='pwned'</script> square <img src=x onerror=\"document.title='pwned'\">."
STORIES = [
    {"id": "circle", "steps": [{"text": "Draw a red circle at the top left."}]},
    {"id": "markup", "steps": [{"text": MARKUP}]},
    {"id": "square", "steps": [{"text": "Here is a blue square in the middle.", "image": "start.png"},
                               {"text": "It moves to the right."}]},
]
FAST = ["--diffusion-steps", "2", "--max-new-tokens", "16"]


def generated_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two generate outputs of the shipped model over the same three stories (greedy, and sampled with
    another seed), made once per test session for every module that asks."""
    from minigpt5_cli.toyworld.world import render

    root = tmp_path_factory.getbasetemp() / "rating-outputs"
    alpha, beta = root / "alpha_run", root / "beta_run"
    if not (root / "done").exists():
        root.mkdir(exist_ok=True)
        render("blue", "square", (1, 1)).save(root / "start.png")
        stories = root / "stories.jsonl"
        stories.write_text("".join(json.dumps(s) + "\n" for s in STORIES))
        assert run_cli("generate", "-s", str(stories), "-o", str(alpha), *FAST) == 0
        assert run_cli("generate", "-s", str(stories), "-o", str(beta), "--seed", "1", "--temperature", "1", *FAST) == 0
        (root / "done").touch()
    return alpha, beta


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return generated_pair(tmp_path_factory)


def images_of(run: Path) -> dict[str, set[str]]:
    """{story id: the media names its generated images get in a study}."""
    found = {}
    for doc_path in run.glob("*/story.json"):
        doc = json.loads(doc_path.read_text())
        found[doc["id"]] = {f"media/{hashlib.sha256((doc_path.parent / name).read_bytes()).hexdigest()[:20]}.png"
                            for g in doc["generated"] for name in g["images"]}
    return found


def page_data(study: Path) -> dict:
    page = (study / "index.html").read_text()
    block = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)


# The statistics, against values computed by hand or printed in textbooks.

def test_wilson_interval_matches_the_textbook_and_the_formula():
    assert stats.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert stats.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    z = 1.959963984540054
    for k, n in ((7, 9), (1, 3), (50, 120)):
        p, d = k / n, 1 + z * z / n
        centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
        assert stats.wilson(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_sign_test_is_the_exact_two_sided_binomial():
    assert stats.sign_test(8, 2) == pytest.approx(2 * (math.comb(10, 8) + math.comb(10, 9) + 1) / 2**10)  # 0.109375
    assert stats.sign_test(7, 1) == pytest.approx(0.0703125)
    assert stats.sign_test(5, 5) == pytest.approx(1.0)
    assert stats.sign_test(0, 0) == 1.0


def test_fleiss_kappa_on_the_textbook_example():
    # Fleiss (1971) as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories; kappa 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [[str(c) for c, count in enumerate(row) for _ in range(count)] for row in table]
    assert stats.fleiss_kappa(items) == pytest.approx(0.2099, abs=1e-4)
    assert stats.fleiss_kappa([["a", "a"], ["b", "b"], ["a", "a"]]) == pytest.approx(1.0)
    assert stats.fleiss_kappa([["a", "a"], ["a", "a"]]) is None  # one category: chance agreement is total
    assert stats.fleiss_kappa([]) is None


# rate build

@pytest.fixture(scope="module")
def study(outputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    alpha, beta = outputs
    assert run_cli("rate", "build", "--a", str(alpha), "--b", str(beta), "--output", str(out), "--seed", "5") == 0
    return out


def test_build_writes_a_blind_self_contained_page(study, outputs):
    key = json.loads((study / "study.json").read_text())
    page = (study / "index.html").read_text()
    assert key["seed"] == 5 and re.fullmatch(r"[0-9a-f]{12}", key["study"])
    assert [p["id"] for p in key["pairs"]] == ["circle", "markup", "square"]
    assert {key["models"]["a"]["label"], key["models"]["b"]["label"]} == {"alpha_run", "beta_run"}
    # Nothing on the page names a model or a run; images are named by their content.
    for name in ("alpha_run", "beta_run", "toy", "vokens", "image-1.png"):
        assert name not in page
    assert sorted(p.name for p in study.iterdir()) == ["index.html", "media", "study.json"]
    assert all(re.fullmatch(r"[0-9a-f]{20}\.png", p.name) for p in (study / "media").iterdir())
    # Offline: no address outside the folder; only the page's own script and style may run.
    assert "http://" not in page and "https://" not in page
    assert re.search(r"script-src 'sha256-[^']+'; style-src 'sha256-[^']+'", page)
    # The story's markup is data, escaped inside the JSON block, never markup.
    assert "<script>document" not in page and "<img src=x" not in page
    data = page_data(study)
    assert data["study"] == key["study"] and data["seed"] == 5 and "models" not in data
    markup = next(p for p in data["pairs"] if p["id"] == "markup")
    assert markup["context"] == [{"text": MARKUP, "image": None}]
    square = next(p for p in data["pairs"] if p["id"] == "square")
    assert square["context"][0]["image"].startswith("media/") and square["context"][1]["image"] is None


def test_the_key_unblinds_each_pair(study, outputs):
    """The page's first and second continuation are the models study.json says, per pair."""
    key = json.loads((study / "study.json").read_text())
    runs = dict(zip("ab", outputs))
    data = page_data(study)
    for pair, slots in zip(data["pairs"], key["pairs"]):
        assert pair["id"] == slots["id"] and sorted(slots["slots"]) == ["a", "b"]
        for continuation, model in zip(pair["continuations"], slots["slots"]):
            shown = {seg["image"] for response in continuation for seg in response if "image" in seg}
            assert shown == images_of(runs[model])[pair["id"]]
            assert (study / next(iter(shown))).is_file()


def test_build_is_reproducible_from_its_seed(study, outputs, tmp_path):
    alpha, beta = outputs
    args = ["rate", "build", "--a", str(alpha), "--b", str(beta), "--output"]
    assert run_cli(*args, str(tmp_path / "again"), "--seed", "5") == 0
    assert (tmp_path / "again" / "index.html").read_bytes() == (study / "index.html").read_bytes()
    assert run_cli(*args, str(tmp_path / "other"), "--seed", "6") == 0
    assert json.loads((tmp_path / "other" / "study.json").read_text())["study"] != \
        json.loads((study / "study.json").read_text())["study"]
    # --overwrite replaces a study; results written into it go with it.
    (tmp_path / "other" / "results.json").write_text("{}")
    assert run_cli(*args, str(tmp_path / "other"), "--seed", "5", "--overwrite") == 0
    assert (tmp_path / "other" / "index.html").read_bytes() == (study / "index.html").read_bytes()
    assert not (tmp_path / "other" / "results.json").exists()


def test_build_takes_single_story_outputs(outputs, tmp_path):
    alpha, beta = outputs
    assert run_cli("rate", "build", "--a", str(alpha / "circle"), "--b", str(beta / "circle"), "-o",
                   str(tmp_path / "s"), "--seed", "1") == 0
    assert [p["id"] for p in page_data(tmp_path / "s")["pairs"]] == ["circle"]
    assert json.loads((tmp_path / "s" / "study.json").read_text())["models"]["a"]["label"] == str(alpha / "circle")


# rate results

def export(key: dict, rater: str, choices: dict[str, dict[str, str]], flip: bool = False) -> dict:
    """A rater's export as the page writes it, from choices named by model ("a", "b", "tie"): the sides
    shown alternate per pair, so the file says A and B for different models from pair to pair."""
    pairs = []
    for k, entry in enumerate(key["pairs"]):
        if entry["id"] not in choices:
            continue
        shown = [0, 1] if (k % 2 == 0) != flip else [1, 0]
        side = {entry["slots"][shown[0]]: "A", entry["slots"][shown[1]]: "B", "tie": "tie"}
        pairs.append({"id": entry["id"], "position": k + 1, "shown": shown,
                      "answers": {q: side[m] for q, m in choices[entry["id"]].items()},
                      "first_shown": "2025-01-01T10:00:00.000Z", "answered": "2025-01-01T10:01:00.000Z"})
    return {"format": "minigpt5-rating", "study": key["study"], "seed": key["seed"], "rater": rater,
            "rater_seed": 1, "started": "2025-01-01T10:00:00.000Z", "exported": "2025-01-01T10:05:00.000Z",
            "questions": ["language", "image", "together"], "pairs": pairs}


def judged(language: str) -> dict[str, dict[str, str]]:
    """Per story in turn, the language answer from `language` (a, b, or t for a tie); image quality
    always b, and text with image together always a tie."""
    return {sid: {"language": "tie" if lang == "t" else lang, "image": "b", "together": "tie"}
            for sid, lang in zip(["circle", "markup", "square"], language)}


def test_results_unblind_and_aggregate(study, tmp_path, capsys):
    key = json.loads((study / "study.json").read_text())
    files = []
    for rater, language, flip in (("r1", "aaa", False), ("r2", "aab", True), ("r3", "ata", False)):
        files.append(tmp_path / f"{rater}.json")
        files[-1].write_text(json.dumps(export(key, rater, judged(language), flip)))
    out = tmp_path / "res"
    capsys.readouterr()
    assert run_cli("rate", "results", str(study), *map(str, files), "--output", str(out)) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    language = report["questions"]["language"]
    # 9 judgements: model a 7, b 1, tie 1.
    assert (language["n"], language["a"]["count"], language["b"]["count"], language["tie"]["count"]) == (9, 7, 1, 1)
    assert language["a"]["share"] == pytest.approx(7 / 9)
    assert language["a"]["ci95"] == pytest.approx(list(stats.wilson(7, 9)))
    assert language["sign_test_p"] == pytest.approx(0.0703125)  # 7 wins to 1: 2 * 9 / 2**8
    image, together = report["questions"]["image"], report["questions"]["together"]
    assert image["b"]["count"] == 9 and image["sign_test_p"] == pytest.approx(2 / 2**9)
    assert together["tie"]["count"] == 9 and together["sign_test_p"] == 1.0
    # Language items: [a a a], [a a tie], [a b a]: P = 5/9, Pe = 51/81, kappa = -0.2.
    assert report["agreement"]["fleiss_kappa"]["language"] == pytest.approx(-0.2)
    assert report["agreement"]["fleiss_kappa"]["image"] is None  # everyone chose b: undefined
    agreement = {r["rater"]: r["agreement"] for r in report["raters"]}
    assert agreement == pytest.approx({"r1": 16 / 18, "r2": 15 / 18, "r3": 15 / 18})
    assert all(r["judgements"] == 9 for r in report["raters"])
    assert (out / "preferences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "77.8%" in printed and "alpha_run" in printed and "0.0703" in printed and "-0.20" in printed


def test_results_use_the_order_each_rater_saw(study, tmp_path):
    """A displayed "A" is the continuation the export says was shown first."""
    key = json.loads((study / "study.json").read_text())
    entry = key["pairs"][0]
    doc = export(key, "solo", {entry["id"]: {"language": "a", "image": "a", "together": "a"}})
    doc["pairs"][0]["shown"] = [1, 0]
    doc["pairs"][0]["answers"] = {"language": "A", "image": "B", "together": "tie"}
    (tmp_path / "solo.json").write_text(json.dumps(doc))
    assert run_cli("rate", "results", str(study), str(tmp_path / "solo.json"), "-o", str(tmp_path)) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    first, second = entry["slots"][1], entry["slots"][0]
    assert report["questions"]["language"][first]["count"] == 1
    assert report["questions"]["image"][second]["count"] == 1
    assert report["questions"]["together"]["tie"]["count"] == 1
    assert report["agreement"]["fleiss_kappa"]["language"] is None  # one rater
    assert report["raters"][0]["agreement"] is None


def test_kappa_counts_only_the_pairs_every_rater_answered(study, tmp_path):
    key = json.loads((study / "study.json").read_text())
    both = judged("ab")  # circle: a, markup: b
    partial = {"circle": both["circle"]}
    for rater, choices in (("full", both), ("partial", partial)):
        (tmp_path / f"{rater}.json").write_text(json.dumps(export(key, rater, choices)))
    assert run_cli("rate", "results", str(study), str(tmp_path / "full.json"), str(tmp_path / "partial.json"),
                   "-o", str(tmp_path / "out")) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["questions"]["language"]["n"] == 3
    assert report["agreement"]["pairs"]["language"] == 1


def test_results_write_into_the_study_by_default_and_replace_their_own(study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    key = json.loads((copy / "study.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(export(key, "r", judged("aba"))))
    for _ in range(2):
        assert run_cli("rate", "results", str(copy), str(tmp_path / "r.json")) == 0
    assert json.loads((copy / "results.json").read_text())["questions"]["language"]["a"]["count"] == 2
    assert (copy / "preferences.png").is_file()


def test_page_text_that_spells_a_placeholder_or_closes_the_script_stays_data():
    from minigpt5_cli.rating.build import QUESTIONS, render

    text = "__SCRIPT__ __DATA__ </script><script>alert(1)</script> & \u2028"
    page = {"study": "0" * 12, "seed": 1, "title": "__STYLE__ <b>study</b>", "questions": QUESTIONS,
            "pairs": [{"id": "s", "context": [{"text": text, "image": None}], "continuations": [[], []]}]}
    html = render(page)
    block = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(block) == page
    assert "<title>__STYLE__ &lt;b&gt;study&lt;/b&gt;</title>" in html
    assert html.count("<script") == 2
