"""prepare-data --cache-latents over two CPU processes (gloo) writes the dataset one process writes: the
same rows in the same order, the same images, the same latents."""

import json

import numpy as np

from conftest import launch, run_cli
from test_prepare import cc3m_pairs, rows

TENSORS = ("latent_mean", "latent_logvar", "caption_embed")


def test_two_processes_cache_what_one_caches(tmp_path):
    """20 rows in batches of 8: process 0 caches rows 0-15, process 1 rows 16-19; a missing image is rejected."""
    tsv = cc3m_pairs(tmp_path, n=20)
    with tsv.open("a") as f:
        f.write("a lost shape\tmissing.png\n")
    args = lambda out: ["prepare-data", "cc3m", "--input", str(tsv), "--output", str(tmp_path / out),  # noqa: E731
                        "--cache-latents", "--generator", "tiny:sd"]
    assert run_cli(*args("one")) == 0
    proc = launch(*args("two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("20 kept, rejected: missing_image 1") == 1, proc.stdout
    assert proc.stderr.count("caching latents with tiny:sd") == 1, proc.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    summary = lambda folder: json.loads((folder / "summary.json").read_text())  # noqa: E731
    assert summary(two) == summary(one) and summary(one)["cache"]["generator"] == "tiny:sd"
    for name in ("rejects.jsonl", "dataset_info.json"):
        assert (two / name).read_text() == (one / name).read_text(), name
    a, b = (rows(f).with_format("arrow")[:].to_pylist() for f in (one, two))
    assert [r["id"] for r in b] == [r["id"] for r in a] and len(a) == 20
    for x, y in zip(a, b):
        (s,), (t,) = x["steps"], y["steps"]
        assert t["text"] == s["text"] and t["image"] == s["image"]  # the image's bytes as stored
        for name in TENSORS:
            np.testing.assert_allclose(np.asarray(t[name]), np.asarray(s[name]), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"], "no temporary folder left"
