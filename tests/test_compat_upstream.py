"""`evaluate --compat minigpt5` against MiniGPT-5's own `metric.py` (eric-ai-lab/MiniGPT-5).

The values in tests/fixtures/minigpt5_metrics/expected.json were produced by that script, run unchanged
by tools/upstream_metrics.py in its own environment, on the fixture's dialog and story sets, with the
stand-in networks of tools/standins.py (a fixed vector per input for CLIP and S-BERT; random Inception
weights). Ours runs here with the same stand-ins and must give the same values. With MINIGPT5_UPSTREAM
(a checkout) and MINIGPT5_UPSTREAM_PYTHON (the python of an environment set up as the driver's
docstring says), the driver is run again and must reproduce the committed values.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "minigpt5_metrics"
sys.path.insert(0, str(REPO / "tools"))
import standins  # noqa: E402

EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
# Our metric -> the original's key, per set; text metrics are computed by the same libraries (exact), the
# rest through float32 networks on one side and float64 arithmetic on the other.
DIALOG = {"bleu1": "overall_bleu_score_1", "bleu2": "overall_bleu_score_2", "rouge_l": "overall_rouge_l_score",
          "sbert": "overall_sbert_score", "mm_relevance_minigpt5": "overall_clip_f1",
          "is": "overall_instance_inception_score"}
STORY = {"clip_i": "overall_clip_similarity", "clip_t": "overall_clip_t_similarity",
         "fid": "overall_instance_fid_score", "fid_per_story": "overall_fid_score",
         "is": "overall_instance_inception_score"}
EXACT = {"bleu1", "bleu2", "rouge_l"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    standins.inception_weights(path)
    return str(path)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr("minigpt5_cli.evaluation.loaders.load_clip", lambda *a, **k: standins.Clip())
    monkeypatch.setattr("minigpt5_cli.evaluation.loaders.load_sbert", lambda *a, **k: standins.Sbert())


def _ours(name: str, metrics: str, weights: str, out: Path) -> dict:
    assert run_cli("evaluate", "-p", str(FIXTURE / f"{name}_pred.jsonl"), "-r", str(FIXTURE / f"{name}_ref.jsonl"),
                   "-m", metrics, "--compat", "minigpt5", "--inception-weights", weights, "-o", str(out)) == 0
    return json.loads(out.read_text())["metrics"]


@pytest.mark.parametrize("name,keys,metrics", [("dialog", DIALOG, "mmdialog"),
                                               ("story", STORY, "clip_i,clip_t,fid,is")])
def test_compat_equals_the_original_script(name, keys, metrics, weights, stand_ins, tmp_path):
    ours = _ours(name, metrics, weights, tmp_path / "m.json")
    theirs = EXPECTED["results"][name]
    for metric, key in keys.items():
        tolerance = 1e-9 if metric in EXACT else 1e-4
        assert ours[metric]["value"] == pytest.approx(theirs[key], rel=tolerance, abs=tolerance), (metric, key)


def test_the_fixture_makes_each_quirk_matter(weights, stand_ins, tmp_path):
    """Without --compat the same fixture gives other values: each compat path is exercised, not idle."""
    theirs = {**EXPECTED["results"]["dialog"], **EXPECTED["results"]["story"]}
    out = tmp_path / "m.json"
    assert run_cli("evaluate", "-p", str(FIXTURE / "story_pred.jsonl"), "-r", str(FIXTURE / "story_ref.jsonl"),
                   "-m", "clip_i,clip_t,is", "--inception-weights", weights, "-o", str(out)) == 0
    plain = json.loads(out.read_text())["metrics"]
    for metric in ("clip_i", "clip_t", "is"):  # (FID's default costs another 2048-d matrix root: left out)
        assert plain[metric]["value"] != pytest.approx(theirs[STORY[metric]], rel=1e-3), metric
    assert run_cli("evaluate", "-p", str(FIXTURE / "dialog_pred.jsonl"), "-r", str(FIXTURE / "dialog_ref.jsonl"),
                   "-m", "mm_relevance", "-o", str(out)) == 0
    plain = json.loads(out.read_text())["metrics"]
    assert plain["mm_relevance"]["value"] != pytest.approx(theirs["overall_clip_f1"], abs=1e-3)


@pytest.mark.skipif(not (os.environ.get("MINIGPT5_UPSTREAM") and os.environ.get("MINIGPT5_UPSTREAM_PYTHON")),
                    reason="needs MINIGPT5_UPSTREAM (a MiniGPT-5 checkout) and MINIGPT5_UPSTREAM_PYTHON (its env)")
def test_the_original_script_reproduces_the_committed_values(tmp_path):
    out = tmp_path / "expected.json"
    subprocess.run([os.environ["MINIGPT5_UPSTREAM_PYTHON"], str(REPO / "tools" / "upstream_metrics.py"),
                    "--upstream", os.environ["MINIGPT5_UPSTREAM"], "--out", str(out)], check=True,
                   capture_output=True)
    fresh = json.loads(out.read_text())
    assert fresh["commit"] == EXPECTED["commit"]
    for name in ("dialog", "story"):
        for key, value in EXPECTED["results"][name].items():
            assert fresh["results"][name][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (name, key)


def test_the_script_s_ids_targets_and_reference_images():
    from PIL import Image

    from minigpt5_cli.evaluation import compat as C

    assert C.dialog_step("123_4-mm") == ("123", "4") and C.dialog_step("story0_3-multimodal") == ("story0", "3")
    # MMDialog's conversation ids are often negative: each stays one dialog
    assert C.dialog_step("-5632896413199993329") == ("-5632896413199993329", "")
    assert C.dialog_step("-56_2") == ("-56", "2")
    assert C.target_text(" a dog ", True) == "a dog [IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###"
    assert C.target_text("", True).startswith("[IMG0]") and C.target_text("a dog", False) == "a dog ###"
    tall = C.reference_image(Image.new("RGB", (10, 20), (255, 0, 0)))
    assert tall.size == (512, 512)
    assert tall.getpixel((5, 256)) == (255, 255, 255) and tall.getpixel((256, 256)) == (255, 0, 0)
    assert C.fid_image(Image.new("RGB", (64, 48))).size == (341, 256)
