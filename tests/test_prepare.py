"""prepare-data on tiny fixtures written in the exact raw formats, with every kind of bad record."""

import io
import json
import tarfile

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from minigpt5_cli.data import prepare as P
from minigpt5_cli import recipe as R
from minigpt5_cli.data.collate import Collator
from minigpt5_cli.data.samples import TrainSet
from minigpt5_cli.data.sources import load_source
from minigpt5_cli.data.readers import clean_caption
from minigpt5_cli.training.train import model_for

from conftest import DEBUG, run_cli

CORRUPT = b"\xff\xd8\xff\xe0 this is not a jpeg"


def image_bytes(fmt="JPEG", size=(40, 30), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def truncated(fmt="JPEG") -> bytes:
    data = image_bytes(fmt, size=(64, 64))
    return data[: len(data) // 2]


def prepare(*argv, expect=0):
    assert run_cli("prepare-data", *map(str, argv)) == expect
    return json.loads((argv[argv.index("--output") + 1] / "summary.json").read_text()) if expect == 0 else None


def rows(folder):
    return datasets.load_from_disk(str(folder))


def rejects(folder):
    return [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]


# -- CC3M ---------------------------------------------------------------------------------------

def test_cc3m_official_tsv_with_downloaded_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.jpg").write_bytes(image_bytes())
    (tmp_path / "imgs" / "00001.png").write_bytes(image_bytes("PNG"))
    (tmp_path / "imgs" / "3.jpg").write_bytes(truncated())  # row 2 was never downloaded
    (tmp_path / "imgs" / "4.jpg").write_bytes(image_bytes())
    (tmp_path / "train.tsv").write_text(
        "A Dog (running) on: the beach!\thttp://x/0.jpg\nsun set\thttp://x/1.png\nlost\thttp://x/2.jpg\n"
        "broken\thttp://x/3.jpg\n.!;~\thttp://x/4.jpg\n")
    out = tmp_path / "out"
    summary = prepare("cc3m", "--input", tmp_path / "train.tsv", "--images", tmp_path / "imgs", "--output", out)
    assert summary["layout"] == "official-tsv" and summary["kept"] == 2
    assert summary["rejected"] == {"missing_image": 1, "corrupt_image": 1, "empty_caption": 1}
    ds = rows(out)
    assert ds[0]["steps"][0]["text"] == "a dog running on the beach" and ds[1]["id"] == "row1"
    assert [(r["id"], r["reason"]) for r in rejects(out)] == [("row2", "missing_image"), ("row3", "corrupt_image"),
                                                              ("row4", "empty_caption")]


def test_cc3m_official_tsv_needs_images_folder(tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("a cat\thttp://x/0.jpg\n")
    prepare("cc3m", "--input", tmp_path / "train.tsv", "--output", tmp_path / "out", expect=2)
    assert "--images" in capsys.readouterr().err


def write_shard(path, samples, cut=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)


def test_cc3m_webdataset_shards_including_a_truncated_one(tmp_path):
    wds = tmp_path / "wds"
    wds.mkdir()

    def sample(key, caption, image=None):
        meta = json.dumps({"key": key, "caption": caption, "status": "success"}).encode()
        return ([(f"{key}.jpg", image)] if image is not None else []) + [(f"{key}.txt", caption.encode()),
                                                                        (f"{key}.json", meta)]

    write_shard(wds / "00000.tar", sample("000000000", "A red car.", image_bytes()) +
                sample("000000001", "broken", CORRUPT) + sample("000000002", "no picture"))
    shard = sample("000010000", "a blue boat", image_bytes()) + sample("000010001", "cut off", image_bytes(size=(300, 300)))
    write_shard(wds / "00001.tar", shard)
    with tarfile.open(wds / "00001.tar") as tar:
        cut = next(m.offset_data + m.size // 2 for m in tar if m.name == "000010001.jpg")
    (wds / "00001.tar").write_bytes((wds / "00001.tar").read_bytes()[:cut])  # ends inside the second image
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), wds / "00000.parquet")  # metadata only
    out = tmp_path / "out"
    summary = prepare("cc3m", "--input", wds, "--output", out)
    assert summary["layout"] == "webdataset" and summary["kept"] == 2
    assert summary["rejected"] == {"corrupt_image": 1, "missing_image": 1, "truncated_tar": 1}
    assert [r["steps"][0]["text"] for r in rows(out)] == ["a red car", "a blue boat"]
    assert {r["id"]: r["reason"] for r in rejects(out)} == {
        "000000001": "corrupt_image", "000000002": "missing_image", "000010001": "truncated_tar"}


def test_cc3m_files_layout(tmp_path):
    d = tmp_path / "files" / "00000"
    d.mkdir(parents=True)
    for key, caption, fmt in (("000000000", "one", "JPEG"), ("000000001", "two", None), ("000000002", "three", "PNG")):
        (d / f"{key}.txt").write_text(caption)
        if fmt:
            (d / (key + (".png" if fmt == "PNG" else ".jpg"))).write_bytes(image_bytes(fmt))
    summary = prepare("cc3m", "--input", tmp_path / "files", "--output", tmp_path / "out")
    assert summary["layout"] == "files" and summary["kept"] == 2 and summary["rejected"] == {"missing_image": 1}


def test_cc3m_parquet_with_image_bytes(tmp_path):
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "jpg": [image_bytes(), CORRUPT, None, image_bytes()],
                             "txt": ["First (one)", "second", "third", ""]}), tmp_path / "pq" / "00000.parquet")
    summary = prepare("cc3m", "--input", tmp_path / "pq", "--output", tmp_path / "out", "--no-clean-captions")
    assert summary["layout"] == "parquet" and summary["kept"] == 1
    assert summary["rejected"] == {"corrupt_image": 1, "missing_image": 1, "empty_caption": 1}
    assert rows(tmp_path / "out")[0]["steps"][0]["text"] == "First (one)"  # cleaning switched off


@pytest.mark.parametrize("header,layout", [("caption\timage_path", "minigpt5-tsv"), ("caption\timage", "gill-tsv")])
def test_cc3m_minigpt5_and_gill_tsv(tmp_path, header, layout):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "b.gif").write_bytes(image_bytes("GIF"))
    (tmp_path / "pairs.tsv").write_text(f"{header}\na cat\ta.jpg\na gif\tb.gif\nnothing\tc.jpg\nbad row\n")
    summary = prepare("cc3m", "--input", tmp_path / "pairs.tsv", "--output", tmp_path / "out")
    assert summary["layout"] == layout and summary["kept"] == 2
    assert summary["rejected"] == {"missing_image": 1, "malformed_record": 1}
    gif = rows(tmp_path / "out")[1]["steps"][0]["image"]
    assert gif.format == "PNG" and gif.mode == "RGB"  # re-encoded losslessly


def test_large_images_are_downscaled_small_ones_kept_as_they_are(tmp_path):
    big, small = image_bytes("JPEG", (1000, 600)), image_bytes("PNG", (50, 40))
    (tmp_path / "big.jpg").write_bytes(big)
    (tmp_path / "small.png").write_bytes(small)
    (tmp_path / "p.tsv").write_text("caption\timage\nbig\tbig.jpg\nsmall\tsmall.png\n")
    prepare("cc3m", "--input", tmp_path / "p.tsv", "--output", tmp_path / "out", "--image-size", "300")
    table = rows(tmp_path / "out").with_format("arrow")[:]
    images = [steps[0]["image"] for steps in table.column("steps").to_pylist()]
    assert Image.open(io.BytesIO(images[0]["bytes"])).size == (500, 300)
    assert images[1]["bytes"] == small


def test_all_rejected_gives_an_empty_dataset_and_says_why(tmp_path, capsys):
    (tmp_path / "p.tsv").write_text("caption\timage\nx\tnope.jpg\n")
    summary = prepare("cc3m", "--input", tmp_path / "p.tsv", "--output", tmp_path / "out")
    assert summary["kept"] == 0 and summary["rejected"] == {"missing_image": 1} and len(rows(tmp_path / "out")) == 0
    assert "no record was kept" in capsys.readouterr().err
    assert run_cli("train", "--recipe", str(DEBUG / "stage1.yaml"), f"data.train={tmp_path / 'out'}",
                   f"train.output_dir={tmp_path / 'run'}") == 2
    assert "holds no rows" in capsys.readouterr().err


def test_oversized_images_and_broken_text_are_rejected_with_their_reason(tmp_path):
    """A 1 x 100000 PNG (a few hundred bytes) and a record whose text holds an unpaired surrogate are
    rejects with a reason, not a memory blow-up or a traceback from the dataset writer."""
    Image.new("RGB", (1, 100_000)).save(tmp_path / "thin.png")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "ok.png")
    conversations = [
        {"conversation_id": 0, "conversation": [{"turn": [{"__TEXT__": "a"}, {"__MEDIA__": "ok"}]},
                                                {"turn": [{"__TEXT__": "b"}]}]},
        {"conversation_id": 1, "conversation": [{"turn": [{"__TEXT__": "c"}, {"__MEDIA__": "thin"}]},
                                                {"turn": [{"__TEXT__": "d"}]}]},
    ]
    for name in ("ok", "thin"):
        (tmp_path / f"{name}.jpg").write_bytes((tmp_path / f"{name}.png").read_bytes())
    lines = [json.dumps(c) for c in conversations]
    lines.append('{"conversation_id": 2, "conversation": [{"turn": [{"__TEXT__": "e\\ud800"}]}, '
                 '{"turn": [{"__TEXT__": "f"}]}]}')
    (tmp_path / "c.json").write_text("\n".join(lines) + "\n")
    summary = prepare("mmdialog", "--input", tmp_path / "c.json", "--output", tmp_path / "out")
    assert summary["kept"] == 1 and summary["rejected"] == {"malformed_record": 1, "oversized_image": 1}
    reasons = {r["id"]: (r["reason"], r["detail"]) for r in rejects(tmp_path / "out")}
    assert reasons["1"] == ("oversized_image", "step 1: 1 x 100000 pixels, more than 20 times longer than wide")
    assert reasons["2"][0] == "malformed_record"


def test_clean_caption_follows_the_original():
    assert clean_caption('  The "Best" cake: (ever)*; #1~!  ') == "the best cake ever 1"


# -- VIST ---------------------------------------------------------------------------------------

def vist_fixture(root, split="train"):
    """Four stories: one whole (jpg, png and gif images, steps shuffled), one with a missing
    image, one with a step missing, one with a corrupt image."""
    images = root / "images" / split
    images.mkdir(parents=True)
    annotations = []

    def story(sid, photos, texts=None):
        for order, photo in enumerate(photos):
            annotations.append([{"original_text": f"Story {sid}, step {order}.", "text": f"story {sid} step {order} .",
                                 "album_id": "1", "photo_flickr_id": photo, "setting": "first-2-pick-and-tell",
                                 "worker_id": "W", "story_id": sid, "tier": "story-in-sequence",
                                 "worker_arranged_photo_order": order, "storylet_id": f"{sid}{order}"}])

    for i, ext in enumerate(["jpg", "png", "gif", "jpg", "png"]):
        (images / f"10{i}.{ext}").write_bytes(image_bytes({"jpg": "JPEG", "png": "PNG", "gif": "GIF"}[ext]))
    story("s1", ["100", "101", "102", "103", "104"])
    story("s2", ["100", "101", "999", "103", "104"])
    story("s3", ["100", "101", "102", "103"])
    (images / "200.jpg").write_bytes(CORRUPT)
    story("s4", ["100", "101", "102", "103", "200"])
    annotations = annotations[:5][::-1] + annotations[5:]  # order in the file does not matter
    sis = root / "sis"
    sis.mkdir()
    (sis / f"{split}.story-in-sequence.json").write_text(json.dumps(
        {"info": {}, "type": "x", "images": [{"id": "100", "url_o": "http://x"}], "albums": [],
         "annotations": annotations}))
    return root


def test_vist_story_in_sequence(tmp_path):
    root = vist_fixture(tmp_path / "vist")
    out = tmp_path / "out"
    summary = prepare("vist", "--input", root, "--split", "train", "--output", out)
    assert summary["layout"] == "story-in-sequence" and summary["kept"] == 1
    assert summary["rejected"] == {"missing_image": 1, "missing_step": 1, "corrupt_image": 1}
    (row,) = rows(out)
    assert row["id"] == "s1" and [s["text"] for s in row["steps"]] == [f"Story s1, step {k}." for k in range(5)]
    assert all(s["image"] is not None for s in row["steps"])
    # The same from the annotation file and an explicit image folder.
    summary = prepare("vist", "--input", root / "sis" / "train.story-in-sequence.json", "--images",
                      root / "images" / "train", "--output", tmp_path / "out2")
    assert summary["kept"] == 1


def test_vist_continuation_set(tmp_path):
    root = vist_fixture(tmp_path / "vist", split="test")
    out = tmp_path / "out"
    prepare("vist", "--input", root, "--split", "test", "--continuation", "--output", out)
    (row,) = rows(out)
    assert len(row["steps"]) == 4 and row["target"]["text"] == "Story s1, step 4." and row["target"]["image"]


def test_vist_root_without_split_reads_its_only_split_or_names_the_choices(tmp_path, capsys):
    root = vist_fixture(tmp_path / "vist", split="val")
    summary = prepare("vist", "--input", root, "--output", tmp_path / "out")
    assert summary["kept"] == 1 and summary["settings"]["split"] == "val"
    vist_fixture(tmp_path / "other", split="test")
    for f in ("sis/test.story-in-sequence.json",):
        (root / f).write_bytes((tmp_path / "other" / f).read_bytes())
    capsys.readouterr()
    prepare("vist", "--input", root, "--output", tmp_path / "out2", expect=2)
    assert capsys.readouterr().err.strip() == f"error: {root} holds the VIST splits test, val; pick one with --split"


def test_an_error_while_writing_is_not_taken_for_all_rejected(tmp_path, monkeypatch):
    """"Nothing was kept" is decided by counting the kept records, not from any ValueError datasets
    raises: good records and a failing writer must not give an empty dataset."""
    def broken(*args, **kwargs):
        raise ValueError("the writer failed")

    monkeypatch.setattr(datasets.Dataset, "from_generator", broken)
    with pytest.raises(ValueError, match="the writer failed"):
        P.prepare("cc3m", cc3m_pairs(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vist_derived_form_with_image_mapping(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"p{i}.png").write_bytes(image_bytes("PNG"))
    steps = [{"caption": f"c{i}", "image_id": f"i{i}", "sequence_index": i} for i in range(5)]
    (tmp_path / "stories.json").write_text(json.dumps({"a": steps[::-1], "b": steps[:3], "c": steps[:4] + [
        {"caption": "x", "image_id": "nope", "sequence_index": 4}]}))
    (tmp_path / "mapping.json").write_text(json.dumps({f"i{i}": f"img/p{i}.png" for i in range(5)}))
    summary = prepare("vist", "--input", tmp_path / "stories.json", "--image-mapping", tmp_path / "mapping.json",
                      "--output", tmp_path / "out")
    assert summary["layout"] == "derived" and summary["kept"] == 1
    assert summary["rejected"] == {"missing_step": 1, "missing_image": 1}
    assert [s["text"] for s in rows(tmp_path / "out")[0]["steps"]] == ["c0", "c1", "c2", "c3", "c4"]


# -- MMDialog -----------------------------------------------------------------------------------

def mmdialog_lines(folder):
    (folder / "-2682085160072908899.jpg").write_bytes(image_bytes())
    (folder / "42.jpg").write_bytes(truncated())
    conv = [
        {"conversation_id": 0, "conversation": [
            {"turn": [{"__TEXT__": "look at my dog :dog:"}, {"__MEDIA__": "-2682085160072908899"}]},
            {"turn": [{"__TEXT__": "so cute"}]},
            {"turn": [{"__TEXT__": ""}, {"__MEDIA__": "-2682085160072908899"}, {"__MEDIA__": "-2682085160072908899"}]}],
         "negative_candidate_media_keys": [], "negative_candidate_texts": []},
        {"conversation_id": 1, "conversation": [{"turn": [{"__TEXT__": "hi"}, {"__MEDIA__": "123"}]},
                                                {"turn": [{"__TEXT__": "hey"}]}]},
        {"conversation_id": 2, "conversation": [{"turn": [{"__TEXT__": "alone"}]}]},
        {"conversation_id": 3, "conversation": [{"turn": [{"__TEXT__": "a"}]}, {"turn": [{"__TEXT__": "b"}]}]},
        {"conversation_id": 4, "conversation": [{"turn": [{"__TEXT__": "x"}, {"__MEDIA__": "42"}]},
                                                {"turn": [{"__TEXT__": "y"}]}]},
        {"conversation_id": 5, "conversation": "not a list"},
    ]
    lines = [json.dumps(c) for c in conv]
    lines.insert(2, '{"conversation_id": 9, "conversation": [')  # a broken line
    return conv, lines


@pytest.mark.parametrize("framing", ["jsonl", "array"])
def test_mmdialog(tmp_path, framing):
    conv, lines = mmdialog_lines(tmp_path)
    path = tmp_path / "conversations.json"
    if framing == "jsonl":
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps(conv))
    out = tmp_path / "out"
    summary = prepare("mmdialog", "--input", path, "--output", out)
    expected = {"missing_image": 1, "too_short": 1, "corrupt_image": 1, "malformed_record": 1}
    if framing == "jsonl":
        expected["malformed_json"] = 1
    assert summary["kept"] == 2 and summary["rejected"] == expected and summary["extra_media_dropped"] == 1
    first = rows(out)[0]
    assert first["id"] == "0" and [s["text"] for s in first["steps"]] == ["look at my dog :dog:", "so cute", ""]
    assert [s["image"] is not None for s in first["steps"]] == [True, False, True]  # a negative media key


# -- the run as a whole ---------------------------------------------------------------------------

def test_strict_stops_at_the_first_bad_record(tmp_path, capsys):
    _, lines = mmdialog_lines(tmp_path)
    (tmp_path / "c.json").write_text("\n".join(lines))
    prepare("mmdialog", "--input", tmp_path / "c.json", "--output", tmp_path / "out", "--strict", expect=2)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: 1: missing image (media 123)")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_bad_invocations_are_one_line_errors(tmp_path, capsys):
    for argv in (["svhn", "--input", tmp_path], ["cc3m", "--input", tmp_path / "nope.tsv"],
                 ["vist", "--input", tmp_path / "empty"], ["mmdialog", "--input", tmp_path]):
        (tmp_path / "empty").mkdir(exist_ok=True)
        capsys.readouterr()
        assert run_cli("prepare-data", *map(str, argv), "--output", str(tmp_path / "out")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    prepare("vist", "--input", bad, "--images", tmp_path, "--output", tmp_path / "out", expect=2)
    assert "not valid JSON" in capsys.readouterr().err


def test_rerun_is_identical_parallel_or_not_and_refuses_to_clobber(tmp_path, capsys):
    root = vist_fixture(tmp_path / "vist")
    prepare("vist", "--input", root, "--output", tmp_path / "a")
    prepare("vist", "--input", root, "--output", tmp_path / "b", "--num-proc", "2")
    a, b = rows(tmp_path / "a").with_format("arrow")[:], rows(tmp_path / "b").with_format("arrow")[:]
    assert a.equals(b)  # same rows, same image bytes
    prepare("vist", "--input", root, "--output", tmp_path / "a", expect=2)
    assert "--overwrite" in capsys.readouterr().err
    prepare("vist", "--input", root, "--output", tmp_path / "a", "--overwrite")


def test_overwrite_replaces_only_what_prepare_data_wrote(tmp_path, capsys):
    root = vist_fixture(tmp_path / "vist")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    prepare("vist", "--input", root, "--output", mine, "--overwrite", expect=2)
    assert "did not write" in capsys.readouterr().err and (mine / "thesis.tex").is_file()
    (tmp_path / "file").write_text("x")
    prepare("vist", "--input", root, "--output", tmp_path / "file", expect=2)
    assert "is a file" in capsys.readouterr().err


def test_mmdialog_continuation_holds_out_the_last_turn(tmp_path):
    conv, _ = mmdialog_lines(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(conv[:1]))
    prepare("mmdialog", "--input", tmp_path / "c.json", "--output", tmp_path / "out", "--continuation")
    (row,) = rows(tmp_path / "out")
    assert [s["text"] for s in row["steps"]] == ["look at my dog :dog:", "so cute"]
    assert row["target"]["text"] == "" and row["target"]["image"] is not None


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    root = vist_fixture(tmp_path / "vist")
    calls = []

    def boom(item, size):
        calls.append(item)
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "process", boom)
    with pytest.raises(KeyboardInterrupt):
        P.prepare("vist", root, tmp_path / "out")
    assert calls and not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "vist"]


def test_image_paths_outside_their_root_are_rejected_unless_allowed(tmp_path):
    """`..`, absolute paths, symbolic links and media keys that lead out of the data's folder never bring
    a file from elsewhere into the dataset: each such record is a reject; --allow-outside-paths reads them."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "evil.jpg").write_bytes(image_bytes())
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.jpg").write_bytes(image_bytes())
    (data / "link.jpg").symlink_to(secret / "evil.jpg")
    (data / "pairs.tsv").write_text(f"caption\timage_path\nfine\tok.jpg\nup\t../secret/evil.jpg\n"
                                    f"absolute\t{secret / 'evil.jpg'}\nlinked\tlink.jpg\n")
    conversations = [{"conversation_id": i, "conversation": [{"turn": [{"__TEXT__": "a"}, {"__MEDIA__": media}]},
                                                             {"turn": [{"__TEXT__": "b"}]}]}
                     for i, media in enumerate(["ok", "../secret/evil"])]  # a media key that climbs out
    (data / "conversations.json").write_text("\n".join(json.dumps(c) for c in conversations))
    vist = vist_fixture(tmp_path / "vist")
    photo = vist / "images" / "train" / "104.png"  # story s1's last photo, now a link out of the image folder
    photo.unlink()
    photo.symlink_to(secret / "evil.jpg")
    derived = tmp_path / "derived"
    (derived / "img").mkdir(parents=True)
    (derived / "img" / "p.png").write_bytes(image_bytes("PNG"))
    (derived / "stories.json").write_text(json.dumps({"a": [{"caption": f"c{i}", "image_id": f"i{i}",
                                                             "sequence_index": i} for i in range(5)]}))
    (derived / "mapping.json").write_text(json.dumps({**{f"i{i}": "img/p.png" for i in range(4)},
                                                      "i4": "../secret/evil.jpg"}))
    runs = {
        "cc3m": (["cc3m", "--input", data / "pairs.tsv"], 1, 3, 4),
        "mmdialog": (["mmdialog", "--input", data / "conversations.json"], 1, 1, 2),
        "vist": (["vist", "--input", vist, "--split", "train"], 0, 1, 1),
        "vist-derived": (["vist", "--input", derived / "stories.json", "--image-mapping", derived / "mapping.json"],
                         0, 1, 1),
    }
    for name, (argv, kept, outside, allowed) in runs.items():
        out = tmp_path / "out" / name
        summary = prepare(*argv, "--output", out)
        assert summary["kept"] == kept and summary["rejected"].get("image_outside_root") == outside, (name, summary)
        assert sum(r["reason"] == "image_outside_root" for r in rejects(out)) == outside
        assert prepare(*argv, "--output", tmp_path / "allowed" / name, "--allow-outside-paths")["kept"] == allowed


def test_a_dataset_image_stored_as_a_path_stays_inside_the_dataset(tmp_path):
    """prepare-data stores image bytes; a dataset from elsewhere whose cell names a file outside its folder
    is refused when the row is read, rather than that file read."""
    from minigpt5_cli.errors import UserError

    folder = tmp_path / "ds"
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes())
    for name, where in (("inside", folder / "inside" / "a.jpg"), ("outside", secret)):
        steps = [{"text": "a", "image": {"bytes": None, "path": str(secret)}}, {"text": "b", "image": None}]
        datasets.Dataset.from_dict({"id": [name], "steps": [steps]}, features=P.features(False, decode=False)) \
            .save_to_disk(str(folder / name))
        steps[0]["image"]["path"] = str(where)
        (folder / name / "summary.json").write_text("{}")
        shard = next((folder / name).glob("*.arrow"))  # save_to_disk stored the bytes: rewritten as a path alone
        with pa.memory_map(str(shard)) as f:
            table = pa.ipc.open_stream(f).read_all()
        with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_stream(f, table.schema) as out:
            out.write_table(pa.Table.from_pylist([{"id": name, "steps": steps}], schema=table.schema))
    (folder / "inside" / "a.jpg").write_bytes(image_bytes())
    assert load_source(folder / "inside", "2")[0].steps[0].image.open().size == (40, 30)
    with pytest.raises(UserError, match=f"row 0 step 1: its image {tmp_path / 'secret.jpg'} is outside the data set"):
        load_source(folder / "outside", "2")[0]
    # A data set of another schema, its image column a plain string, is held to the same rule.
    strings = folder / "strings"
    datasets.Dataset.from_dict({"id": ["s"], "steps": [[{"text": "a", "image": str(secret)}, {"text": "b", "image": None}]]}) \
        .save_to_disk(str(strings))
    (strings / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="row 0 step 1: its image .* is outside the data set"):
        load_source(strings, "2")[0]


# -- training from prepared data ------------------------------------------------------------------

def cc3m_pairs(tmp_path, n=6):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    lines = ["caption\timage_path"]
    rng = np.random.default_rng(0)
    for i in range(n):  # PNGs, and detailed JPEGs at a quality PIL would not pick by itself
        name = f"{i}.png" if i % 2 else f"{i}.jpg"
        pixels = np.clip(np.asarray(colours[i % 3]) + rng.integers(-40, 40, (32, 36, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name, quality=95)
        lines.append(f"a shape number {i}\t{name}")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.tsv"


def test_training_reads_prepared_datasets(tmp_path):
    prepare("cc3m", "--input", cc3m_pairs(tmp_path), "--output", tmp_path / "cc3m")
    prepare("vist", "--input", vist_fixture(tmp_path / "raw"), "--output", tmp_path / "vist")
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert run_cli("train", "--recipe", str(DEBUG / "stage1.yaml"), f"data.train={tmp_path / 'cc3m'}",
                   f"train.output_dir={s1}", "train.max_steps=2") == 0
    assert run_cli("train", "--recipe", str(DEBUG / "stage2_lora.yaml"), f"data.train={tmp_path / 'vist'}",
                   f"train.output_dir={s2}", f"train.init_from={s1}", "train.max_steps=2",
                   "data.tasks=[gen, multimodal, understanding]") == 0
    assert (s2 / "checkpoint-2" / "adapter").is_dir()


def test_stage2_tasks_build_the_documented_samples(tmp_path):
    prepare("vist", "--input", vist_fixture(tmp_path / "raw"), "--output", tmp_path / "vist")
    source = load_source(tmp_path / "vist", "2")
    ds = TrainSet(source, **_set(True, ["turn", "gen", "multimodal", "understanding"]))
    tasks = [task for _, _, task in ds.index]
    # One story of 5 steps, all with images: turn 4, gen 5, multimodal 4, understanding 4.
    assert [tasks.count(t) for t in ("turn", "gen", "multimodal", "understanding")] == [4, 5, 4, 4]
    by_task = {task: ds[i] for i, (_, k, task) in enumerate(ds.index) if k == 2}
    assert by_task["gen"].history[-1][0] == "Generate an image with the scene description: Story s1, step 2."
    assert by_task["gen"].target == "" and by_task["gen"].vokens
    assert by_task["multimodal"].history[-1] == ("Tell me the next scene with image.", None)
    assert by_task["multimodal"].target == "Story s1, step 2." and by_task["multimodal"].vokens
    text, image = by_task["understanding"].history[-1]
    assert text.startswith("Tell me the next scene description by this image") and image is not None
    assert not by_task["understanding"].vokens and by_task["understanding"].image is None
    assert [h[0] for h in by_task["turn"].history] == ["Story s1, step 0.", "Story s1, step 1."]
    # Text-only LLMs get no understanding samples: the image could not reach them.
    assert "understanding" not in {t for _, _, t in TrainSet(source, **_set(False, ["understanding", "turn"])).index}


def _set(images: bool, tasks: list[str]) -> dict:
    return dict(stage="2", resolution=32, history=4, seed=0, instruction_prob=0.0, images_in_prompt=images, tasks=tasks)


@pytest.mark.parametrize("generator,cond,pooled", [("tiny:sd", [16, 32], None), ("tiny:sdxl", [16, 64], 16),
                                                    ("tiny:sd3", [32, 64], 32), ("tiny:flux", [16, 64], 32)])
def test_cached_latents_give_the_same_loss(tmp_path, generator, cond, pooled):
    tsv = cc3m_pairs(tmp_path)
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    prepare("cc3m", "--input", tsv, "--output", plain)
    summary = prepare("cc3m", "--input", tsv, "--output", cached, "--cache-latents", "--generator", generator)
    assert summary["cache"]["latent_shape"] == [4, 8, 8] and summary["cache"]["cond_shape"] == cond
    assert summary["cache"]["pooled"] == pooled
    step = rows(cached)[0]["steps"][0]
    assert len(step["latent_mean"]) == 4 and len(step["caption_embed"]) == cond[0]
    assert len(step.get("caption_pooled") or []) == (pooled or 0)
    images = lambda folder: [st[0]["image"] for st in rows(folder).with_format("arrow")[:].column("steps").to_pylist()]  # noqa: E731
    assert images(cached) == images(plain)  # the images are stored as they were, not re-encoded
    recipe = R.load(DEBUG / "stage1.yaml", ["data.instruction_prob=0", f"model.generator={generator}"])
    torch.manual_seed(0)
    model = model_for(recipe)
    collate = Collator.for_model(model, recipe.data)
    losses = {}
    for name, folder in (("plain", plain), ("cached", cached)):
        ds = TrainSet(load_source(folder, "1"), stage="1", resolution=model.generator.resolution, history=0, seed=0,
                      instruction_prob=0.0, images_in_prompt=True)
        batch = collate([ds[i] for i in range(4)])
        assert ("latent_mean" in batch) == (name == "cached") and ("caption_embeds" in batch) == (name == "cached")
        torch.manual_seed(1)
        with torch.no_grad():
            losses[name] = model(batch)
    for part in ("loss", "image", "caption"):
        torch.testing.assert_close(losses["cached"][part], losses["plain"][part], atol=1e-5, rtol=1e-4)
    assert losses["plain"]["caption"] > 0


def test_cache_made_for_another_generator_is_refused(tmp_path, capsys):
    prepare("cc3m", "--input", cc3m_pairs(tmp_path), "--output", tmp_path / "cached", "--cache-latents",
            "--generator", "tiny:sd")
    capsys.readouterr()
    assert run_cli("train", "--recipe", str(DEBUG / "stage1.yaml"), f"data.train={tmp_path / 'cached'}",
                   f"train.output_dir={tmp_path / 'run'}", "model.generator=some/other-sd") == 2
    assert "cached for generator 'tiny:sd'" in capsys.readouterr().err
