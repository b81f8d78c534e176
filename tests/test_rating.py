import hashlib
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

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


def pixels(path: Path) -> str:
    """An image told by its pixels: a study writes every image anew, so its files differ from the outputs'."""
    with Image.open(path) as img:
        return f"{img.size}:" + hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()


def images_of(run: Path, study: Path) -> dict[str, set[str]]:
    """{story id: the media names its generated images have on the study's page}."""
    media = {pixels(p): f"media/{p.name}" for p in (study / "raters" / "media").iterdir()}
    found = {}
    for doc_path in run.glob("*/story.json"):
        doc = json.loads(doc_path.read_text())
        found[doc["id"]] = {media[pixels(doc_path.parent / name)] for g in doc["generated"] for name in g["images"]}
    return found


def page_data(study: Path) -> dict:
    page = (study / "raters" / "index.html").read_text()
    block = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)


def text_outputs(root: Path, ids: list[str], **fields) -> tuple[Path, Path]:
    """Two generate outputs over stories `ids` whose continuations are text alone (quick to build a study
    from); `fields` go into every story.json."""
    for name in ("alpha", "beta"):
        for sid in ids:
            (root / name / sid).mkdir(parents=True)
            text = f"{name} goes on."
            doc = {"id": sid, "input": [{"text": f"Story {sid}.", "image": None}], "mode": "vokens",
                   "generated": [{"text": text, "images": [], "segments": [{"text": text}]}], **fields}
            (root / name / sid / "story.json").write_text(json.dumps(doc))
    return root / "alpha", root / "beta"


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
    key = json.loads((study / "key.json").read_text())
    page = (study / "raters" / "index.html").read_text()
    assert key["seed"] == 5 and re.fullmatch(r"[0-9a-f]{12}", key["study"])
    assert [p["id"] for p in key["pairs"]] == ["circle", "markup", "square"]
    assert {key["models"]["a"]["name"], key["models"]["b"]["name"]} == {"alpha_run", "beta_run"}
    # Nothing on the page names a model or a run; images are named by their content.
    for name in ("alpha_run", "beta_run", "toy", "vokens", "image-1.png"):
        assert name not in page
    assert sorted(p.name for p in study.iterdir()) == ["key.json", "raters"]
    assert sorted(p.name for p in (study / "raters").iterdir()) == ["index.html", "media"]
    media = (study / "raters" / "media").iterdir()
    assert all(re.fullmatch(r"[0-9a-f]{20}\.png", p.name) for p in media)
    # Offline: no address outside the folder; only the page's own script and style may run.
    assert "http://" not in page and "https://" not in page
    assert re.search(r"script-src 'sha256-[^']+'; style-src 'sha256-[^']+'", page)
    # The story's markup is data, escaped inside the JSON block, never markup.
    assert "<script>document" not in page and "<img src=x" not in page
    data = page_data(study)
    assert data["study"] == key["study"] and data["seed"] == key["page_seed"] and "models" not in data
    markup = next(p for p in data["pairs"] if p["id"] == "markup")
    assert markup["context"] == [{"text": MARKUP, "image": None}]
    square = next(p for p in data["pairs"] if p["id"] == "square")
    assert square["context"][0]["image"].startswith("media/") and square["context"][1]["image"] is None


def test_the_key_unblinds_each_pair(study, outputs):
    """The page's first and second continuation are the models key.json says, per pair."""
    key = json.loads((study / "key.json").read_text())
    runs = dict(zip("ab", outputs))
    data = page_data(study)
    for pair, slots in zip(data["pairs"], key["pairs"]):
        assert pair["id"] == slots["id"] and sorted(slots["slots"]) == ["a", "b"]
        for continuation, model in zip(pair["continuations"], slots["slots"]):
            shown = {seg["image"] for response in continuation for seg in response if "image" in seg}
            assert shown == images_of(runs[model], study)[pair["id"]]
            assert (study / "raters" / next(iter(shown))).is_file()


def test_the_raters_folder_tells_nothing_of_the_key(outputs, tmp_path):
    """The raters get raters/ alone: no file in it names a model or a run, holds the key's seed or its
    sides, and the page's data is the stories and nothing else."""
    alpha, beta = outputs
    study = tmp_path / "study"
    assert run_cli("rate", "build", "--a", str(alpha), "--b", str(beta), "-o", str(study), "--seed", "1234567") == 0
    key = json.loads((study / "key.json").read_text())
    secrets = {str(alpha), str(beta), alpha.name, beta.name, "1234567", "slots", "page_seed"}
    secrets |= {str(m.get(field)) for m in key["models"].values() for field in ("mode", "model")}
    secrets |= {json.dumps(key["pairs"]), json.dumps([p["slots"] for p in key["pairs"]])}
    files = [p for p in (study / "raters").rglob("*") if p.is_file()]
    assert len(files) > 2
    for path in files:
        content = path.read_bytes()
        assert [s for s in secrets if s.encode() in content] == [], path
    data = page_data(study)
    assert set(data) == {"study", "seed", "title", "questions", "pairs"}
    assert all(set(p) == {"id", "context", "continuations"} for p in data["pairs"])
    # The key alone tells the page's first continuation from its second, and it unblinds.
    doc = export(key, "r", judged("aab"))
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert run_cli("rate", "results", str(study), str(tmp_path / "r.json")) == 0
    report = json.loads((study / "results.json").read_text())
    assert report["questions"]["language"]["preferences"][alpha.name]["count"] == 2
    assert report["questions"]["image"]["preferences"][beta.name]["count"] == 3
    assert sorted(p.name for p in (study / "raters").iterdir()) == ["index.html", "media"]


def test_the_page_seed_tells_nothing_of_the_sides(tmp_path):
    """The page's seed is drawn from the key's through SHA-256: only trying every one of 2**63 seeds
    would lead back. And the sides are another draw from the key's seed: no generator seeded with the
    page's seed (Python's, which drew them when the page's seed was the study's, or the build's own
    draw) tells them better than chance."""
    alpha, beta = text_outputs(tmp_path, [f"s{i:02d}" for i in range(64)])
    study = tmp_path / "study"
    assert run_cli("rate", "build", "--a", str(alpha), "--b", str(beta), "-o", str(study), "--seed", "7") == 0
    key, data = json.loads((study / "key.json").read_text()), page_data(study)
    assert data["seed"] == key["page_seed"] == random.Random(hashlib.sha256(b"page:7").digest()).randrange(2**31)
    assert all(set(p) == {"id", "context", "continuations"} for p in data["pairs"])  # no sides on the page
    flips = [p["slots"] == ["b", "a"] for p in key["pairs"]]
    assert 16 < sum(flips) < 48  # a fair draw per pair
    python = random.Random(data["seed"])
    build = random.Random(hashlib.sha256(f"sides:{data['seed']}".encode()).digest())
    for rng in (python, build):
        guess = [rng.random() >= 0.5 for _ in flips]
        assert 16 < sum(g == f for g, f in zip(guess, flips)) < 48


def test_build_is_reproducible_from_its_seed(study, outputs, tmp_path):
    alpha, beta = outputs
    args = ["rate", "build", "--a", str(alpha), "--b", str(beta), "--output"]
    assert run_cli(*args, str(tmp_path / "again"), "--seed", "5") == 0
    page = study / "raters" / "index.html"
    assert (tmp_path / "again" / "raters" / "index.html").read_bytes() == page.read_bytes()
    assert (tmp_path / "again" / "key.json").read_bytes() == (study / "key.json").read_bytes()
    assert run_cli(*args, str(tmp_path / "other"), "--seed", "6") == 0
    assert json.loads((tmp_path / "other" / "key.json").read_text())["study"] != \
        json.loads((study / "key.json").read_text())["study"]
    # --overwrite replaces a study; results written into it go with it.
    (tmp_path / "other" / "results.json").write_text("{}")
    assert run_cli(*args, str(tmp_path / "other"), "--seed", "5", "--overwrite") == 0
    assert (tmp_path / "other" / "raters" / "index.html").read_bytes() == page.read_bytes()
    assert not (tmp_path / "other" / "results.json").exists()


def test_build_takes_single_story_outputs(outputs, tmp_path):
    alpha, beta = outputs
    assert run_cli("rate", "build", "--a", str(alpha / "circle"), "--b", str(beta / "circle"), "-o",
                   str(tmp_path / "s"), "--seed", "1") == 0
    assert [p["id"] for p in page_data(tmp_path / "s")["pairs"]] == ["circle"]
    # Both folders are called circle: the results name them by as much of their paths as differs.
    models = json.loads((tmp_path / "s" / "key.json").read_text())["models"]
    assert (models["a"]["name"], models["b"]["name"]) == ("alpha_run/circle", "beta_run/circle")


def test_build_takes_only_images_inside_the_outputs(outputs, tmp_path, capsys):
    """A generate output is someone else's folder: a link out of it, a path in its story.json that
    leaves it, or a file that is no image, is refused in one line, and nothing reaches the raters."""
    alpha, beta = outputs
    secret = tmp_path / "secret.txt"
    secret.write_text("the organiser's private notes\n")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(alpha / "square", elsewhere)

    def build(name: str, damage) -> str:
        a = tmp_path / name / "a"
        shutil.copytree(alpha, a)
        damage(a)
        capsys.readouterr()
        code = run_cli("rate", "build", "--a", str(a), "--b", str(beta), "-o", str(tmp_path / name / "study"))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["a"]  # no study, no temporary
        return err.strip()

    def link(a: Path, target: Path, name: str = "circle/image-1.png") -> None:
        (a / name).unlink()
        (a / name).symlink_to(target)

    def names(a: Path, image: str) -> None:
        doc = json.loads((a / "circle" / "story.json").read_text())
        doc["generated"][0]["images"] = [image]
        doc["generated"][0]["segments"] = [{"text": "here."}, {"image": image}]
        (a / "circle" / "story.json").write_text(json.dumps(doc))

    # A real link to a file outside, named as an image: the secret never reaches the raters.
    err = build("secret", lambda a: link(a, secret))
    assert err == f"error: {tmp_path}/secret/a/circle/image-1.png leads outside --a {tmp_path}/secret/a (a link?); " \
                  "rate build takes only the files inside the outputs"
    err = build("image", lambda a: link(a, alpha.parent / "start.png"))  # an image, but not this output's
    assert "image-1.png leads outside --a" in err
    err = build("folder", lambda a: (shutil.rmtree(a / "square"), (a / "square").symlink_to(elsewhere)))
    assert err.startswith(f"error: {tmp_path}/folder/a/square/story.json leads outside --a")
    err = build("dots", lambda a: names(a, "../../../secret.txt"))
    assert err.startswith(f"error: {tmp_path}/dots/a/circle/story.json names the image '../../../secret.txt', "
                          "not a file beside it")
    err = build("absolute", lambda a: names(a, str(secret)))
    assert f"names the image '{secret}'" in err
    secret_bytes = secret.read_bytes()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret and
                secret_bytes in p.read_bytes()]
    err = build("text", lambda a: shutil.copy(secret, a / "circle" / "image-1.png"))  # no link: no image
    assert err == f"error: image does not decode: {tmp_path}/text/a/circle/image-1.png"
    # A link that stays inside its output is followed: the same image, once.
    a = tmp_path / "inside" / "a"
    shutil.copytree(alpha, a)
    link(a, Path("../circle/image-1.png"), "markup/image-1.png")
    assert run_cli("rate", "build", "--a", str(a), "--b", str(beta), "-o", str(tmp_path / "inside" / "study")) == 0
    key = json.loads((tmp_path / "inside" / "study" / "key.json").read_text())
    pairs = zip(page_data(tmp_path / "inside" / "study")["pairs"], key["pairs"])
    shown = {p["id"]: {seg["image"] for response in p["continuations"][slots["slots"].index("a")]
                       for seg in response if "image" in seg} for p, slots in pairs}
    assert shown["markup"] == shown["circle"] and len(shown["circle"]) == 1


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
    return {"format": "minigpt5-rating", "study": key["study"], "seed": key["page_seed"], "rater": rater,
            "rater_seed": 1, "started": "2025-01-01T10:00:00.000Z", "exported": "2025-01-01T10:05:00.000Z",
            "questions": ["language", "image", "together"], "pairs": pairs}


def judged(language: str) -> dict[str, dict[str, str]]:
    """Per story in turn, the language answer from `language` (a, b, or t for a tie); image quality
    always b, and text with image together always a tie."""
    return {sid: {"language": "tie" if lang == "t" else lang, "image": "b", "together": "tie"}
            for sid, lang in zip(["circle", "markup", "square"], language)}


def preferred(report: dict, question: str, model: str) -> dict:
    """A question's row for model "a" or "b" (as the key names them: --a, --b) or "tie"."""
    names = {"a": report["models"][0]["name"], "b": report["models"][1]["name"], "tie": "tie"}
    return report["questions"][question]["preferences"][names[model]]


def test_results_unblind_and_aggregate(study, tmp_path, capsys):
    key = json.loads((study / "key.json").read_text())
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
    # The models are named by their output folders, never A or B (the page's sides).
    assert [m["name"] for m in report["models"]] == ["alpha_run", "beta_run"]
    assert list(language["preferences"]) == ["alpha_run", "beta_run", "tie"]
    # 9 judgements: model a 7, b 1, tie 1.
    assert language["n"] == 9 and [preferred(report, "language", m)["count"] for m in ("a", "b", "tie")] == [7, 1, 1]
    assert preferred(report, "language", "a")["share"] == pytest.approx(7 / 9)
    assert preferred(report, "language", "a")["ci95"] == pytest.approx(list(stats.wilson(7, 9)))
    assert language["sign_test_p"] == pytest.approx(0.0703125)  # 7 wins to 1: 2 * 9 / 2**8
    image, together = report["questions"]["image"], report["questions"]["together"]
    assert preferred(report, "image", "b")["count"] == 9 and image["sign_test_p"] == pytest.approx(2 / 2**9)
    assert preferred(report, "together", "tie")["count"] == 9 and together["sign_test_p"] == 1.0
    # Language items: [a a a], [a a tie], [a b a]: P = 5/9, Pe = 51/81, kappa = -0.2.
    assert report["agreement"]["fleiss_kappa"]["language"] == pytest.approx(-0.2)
    assert report["agreement"]["fleiss_kappa"]["image"] is None  # everyone chose b: undefined
    assert report["agreement"]["undefined"] == {"image": "every judgement the same",
                                                "together": "every judgement the same"}
    agreement = {r["rater"]: r["agreement"] for r in report["raters"]}
    assert agreement == pytest.approx({"r1": 16 / 18, "r2": 15 / 18, "r3": 15 / 18})
    assert all(r["judgements"] == 9 for r in report["raters"])
    assert (out / "preferences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "77.8%" in printed and "0.0703" in printed and "-0.20" in printed
    rows = {line.split("│")[1].strip(): line for line in printed.splitlines() if line.count("│") > 2}
    assert {"alpha_run", "beta_run", "tie"} <= set(rows) and not {"A", "B", "a", "b"} & set(rows)
    assert "alpha_run: --a" in printed and "beta_run: --b" in printed  # which folder each is
    assert rows["Fleiss' kappa"].count("n/a (all alike)") == 2


def test_results_use_the_order_each_rater_saw(study, tmp_path, capsys):
    """A displayed "A" is the continuation the export says was shown first."""
    key = json.loads((study / "key.json").read_text())
    entry = key["pairs"][0]
    doc = export(key, "solo", {entry["id"]: {"language": "a", "image": "a", "together": "a"}})
    doc["pairs"][0]["shown"] = [1, 0]
    doc["pairs"][0]["answers"] = {"language": "A", "image": "B", "together": "tie"}
    (tmp_path / "solo.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert run_cli("rate", "results", str(study), str(tmp_path / "solo.json"), "-o", str(tmp_path)) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "results.json").read_text())
    first, second = entry["slots"][1], entry["slots"][0]
    assert preferred(report, "language", first)["count"] == 1
    assert preferred(report, "image", second)["count"] == 1
    assert preferred(report, "together", "tie")["count"] == 1
    assert report["agreement"]["fleiss_kappa"]["language"] is None  # one rater
    assert report["agreement"]["undefined"]["language"] == "one rater"
    assert report["raters"][0]["agreement"] is None
    # What is undefined says why, rather than a bare "-".
    assert printed.count("n/a (one rater)") == 4 and " - " not in printed


def test_kappa_counts_only_the_pairs_every_rater_answered(study, tmp_path):
    key = json.loads((study / "key.json").read_text())
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
    key = json.loads((copy / "key.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(export(key, "r", judged("aba"))))
    for _ in range(2):
        assert run_cli("rate", "results", str(copy), str(tmp_path / "r.json")) == 0
    assert preferred(json.loads((copy / "results.json").read_text()), "language", "a")["count"] == 2
    assert (copy / "preferences.png").is_file()


def test_results_read_a_study_of_the_earlier_layout(study, outputs, tmp_path):
    """A study built before the key left the raters' folder: its key, study.json, lies beside index.html
    and media/, its page's seed is the study's seed, and its models are labelled. It still unblinds, and
    rate build --overwrite replaces it."""
    key = json.loads((study / "key.json").read_text())
    old = tmp_path / "old"
    shutil.copytree(study / "raters", old)
    models = {m: {"label": Path(model["path"]).name, "path": model["path"], "mode": model["mode"],
                  "model": model["model"]} for m, model in key["models"].items()}
    (old / "study.json").write_text(json.dumps(
        {"format": "minigpt5-study", "study": key["study"], "seed": key["page_seed"], "title": key["title"],
         "questions": key["questions"], "models": models, "pairs": key["pairs"]}, indent=2, ensure_ascii=False))
    (tmp_path / "r.json").write_text(json.dumps(export(key, "r", judged("aab"))))
    assert run_cli("rate", "results", str(old), str(tmp_path / "r.json")) == 0
    report = json.loads((old / "results.json").read_text())
    assert report["seed"] == key["page_seed"]
    assert [(m["name"], m["option"], m["path"]) for m in report["models"]] == \
        [(models[m]["label"], f"--{m}", models[m]["path"]) for m in "ab"]
    assert preferred(report, "language", "a")["count"] == 2 and preferred(report, "image", "b")["count"] == 3
    # Its study.json, named as the key.
    assert run_cli("rate", "results", str(old / "study.json"), str(tmp_path / "r.json"), "-o", str(tmp_path)) == 0
    assert json.loads((tmp_path / "results.json").read_text())["questions"] == report["questions"]
    alpha, beta = outputs
    assert run_cli("rate", "build", "--a", str(alpha), "--b", str(beta), "-o", str(old), "--overwrite") == 0
    assert sorted(p.name for p in old.iterdir()) == ["key.json", "raters"]


def test_results_print_names_and_rater_ids_as_they_are(study, tmp_path, capsys):
    """A model's name and a rater's id are text: neither rich's markup nor matplotlib's math reads them."""
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    key = json.loads((copy / "key.json").read_text())
    key["models"]["a"]["name"] = "[/a] $\\nosuch$"
    (copy / "key.json").write_text(json.dumps(key))
    (tmp_path / "r.json").write_text(json.dumps(export(key, "[bold]r[/bold] [/x]", judged("aab"))))
    capsys.readouterr()
    assert run_cli("rate", "results", str(copy), str(tmp_path / "r.json")) == 0
    printed = capsys.readouterr().out
    rows = {line.split("│")[1].strip() for line in printed.splitlines() if line.count("│") > 2}
    assert {"[/a] $\\nosuch$", "[bold]r[/bold] [/x]"} <= rows
    assert (copy / "preferences.png").is_file()


def test_build_keeps_only_texts_as_a_models_mode_and_name(tmp_path):
    """A story.json whose model is not an object, or whose mode is not a text, still builds, and its key reads."""
    alpha, beta = text_outputs(tmp_path, ["s1"], model="toy", mode=3)
    assert run_cli("rate", "build", "--a", str(alpha), "--b", str(beta), "-o", str(tmp_path / "study")) == 0
    key = json.loads((tmp_path / "study" / "key.json").read_text())
    assert [(m["mode"], m["model"]) for m in key["models"].values()] == [(None, None)] * 2
    (tmp_path / "r.json").write_text(json.dumps(export(key, "r", {"s1": {"language": "a"}})))
    assert run_cli("rate", "results", str(tmp_path / "study"), str(tmp_path / "r.json")) == 0


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


def test_the_page_is_readable_by_all_and_the_key_by_its_owner_alone(outputs, tmp_path):
    """Served by a web server, the raters' folder must be readable; the key, beside it, must not be."""
    import os

    alpha, beta = outputs
    old = os.umask(0o022)
    try:
        assert run_cli("rate", "build", "--a", str(alpha), "--b", str(beta), "-o", str(tmp_path / "s"), "--seed",
                       "1") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "s" / "raters" / "index.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "s" / "raters").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "s" / "key.json").stat().st_mode & 0o777 == 0o600
