"""evaluate over two CPU processes (gloo) scores as one process does: the features are extracted in
shards and gathered, the metrics computed alike, the files written once."""

import csv
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import launch, run_cli
from test_evaluate import _jsonl, _with_images, sentences, tiny_clip, tiny_inception  # noqa: F401 (fixtures)

NAMES = ["red_circle", "red_square", "blue_circle", "blue_square", "green_circle", "green_square", "yellow_circle"]
METRICS = "clip_i,clip_t,mm_relevance,mm_relevance_minigpt5,fid,is,sbert,rouge_l,bleu1,bleu2"
TEXT = {"bleu1", "bleu2", "rouge_l"}


@pytest.fixture
def samples(tmp_path):
    """Seven predictions and references over three stories: 14 images, 14 texts, so batches of
    2 split unevenly over two processes."""
    _with_images(tmp_path, NAMES)
    for n in NAMES:  # the references: other images (FID is not 0)
        ImageOps.invert(Image.open(tmp_path / f"{n}.png").convert("RGB")).save(tmp_path / f"ref_{n}.png")
    ids = ["st1_1", "st1_2", "st1_3", "st2_1", "st2_2", "st3_1", "st3_2"]
    texts, refs = sentences(11, 7), sentences(12, 7)
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": i, "text": t, "images": [f"{n}.png"]}
                                           for i, t, n in zip(ids, texts, NAMES)])
    refs = _jsonl(tmp_path / "r.jsonl", [{"id": i, "text": t, "images": [f"ref_{n}.png"]}
                                          for i, t, n in zip(ids, refs, NAMES[::-1])])
    return preds, refs


@pytest.mark.parametrize("compat", [False, True], ids=["plain", "compat"])
def test_two_processes_score_as_one(tmp_path, samples, tiny_clip, tiny_inception, compat):  # noqa: F811
    preds, refs = samples
    extra = ["--compat", "minigpt5"] if compat else ["--fid-real-stats", str(tmp_path / "real.npz")]
    args = lambda name: ["evaluate", "-p", str(preds), "-r", str(refs), "-m", METRICS, "-b", "2", "--is-splits", "2",  # noqa: E731
                         "--clip-model", tiny_clip, "--inception-weights", tiny_inception, *extra,
                         "-o", str(tmp_path / name / "m.json")]
    assert run_cli(*args("one")) == 0
    if not compat:
        (tmp_path / "real.npz").rename(tmp_path / "one.npz")  # written again by the second run
    proc = launch(*args("two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("95% CI") == 1, "one process prints"
    one, two = (json.loads((tmp_path / n / "m.json").read_text()) for n in ("one", "two"))
    assert list(two["metrics"]) == list(one["metrics"])
    assert compat or list(one["metrics"]) == METRICS.split(",")
    for name, a in one["metrics"].items():
        b = two["metrics"][name]
        assert b.keys() == a.keys(), name
        for key, value in a.items():
            if name in TEXT or not isinstance(value, (float, list)):
                assert b[key] == value, (name, key)
            else:
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (name, key)
    if not compat:
        with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "real.npz") as b:
            np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-5, atol=1e-7)
    rows = {}
    for name in ("one", "two"):
        with (tmp_path / name / "m.samples.csv").open() as f:
            rows[name] = list(csv.reader(f))
    assert [r[0] for r in rows["two"]] == [r[0] for r in rows["one"]] and rows["two"][0] == rows["one"][0]
    np.testing.assert_allclose(np.array(rows["two"][1:])[:, 1:].astype(float),
                               np.array(rows["one"][1:])[:, 1:].astype(float), rtol=1e-5, atol=1e-6)


def test_an_image_one_process_cannot_decode_stops_both(tmp_path, samples, tiny_clip):  # noqa: F811
    """The second batch, process 1's, holds a broken image: both processes stop, the main one with its one line."""
    preds, refs = samples
    (tmp_path / "blue_circle.png").write_bytes(b"not a png")
    proc = launch("evaluate", "-p", str(preds), "-r", str(refs), "-m", "clip_i", "-b", "2", "--clip-model", tiny_clip,
                  "-o", str(tmp_path / "m.json"))
    assert proc.returncode != 0
    line = f"error: image does not decode: {tmp_path / 'blue_circle.png'}"
    assert proc.stderr.count(line) == 1 and "error: " not in proc.stderr.replace(line, ""), proc.stderr[-3000:]
    assert "minigpt5_cli/" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "m.json").exists()


def test_each_process_runs_the_batches_dealt_to_it(monkeypatch):
    """Batches of 2 over two processes: process 1 runs the 2nd and the 4th, and gets all results in order."""
    from minigpt5_cli import processes

    ran = []
    monkeypatch.setattr(processes, "_place", lambda: (1, 2))
    monkeypatch.setattr(processes, "gather", lambda part, error=None: [["theirs", "theirs"], part])
    out = processes.spread(list(range(7)), 2, lambda chunk: ran.append(chunk) or [10 * x for x in chunk])
    assert ran == [[2, 3], [6]]
    assert out == ["theirs", "theirs", 20, 30, "theirs", "theirs", 60]
