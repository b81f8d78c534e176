"""prepare-data opening|isg|mmie and export: the benchmarks read as distributed, and answers written back as their
scorers read them. The fixtures are tiny hand-made records shaped as the benchmarks' own."""

import copy
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from conftest import DEBUG, run_cli
from minigpt5_cli.interleaved.formats import steps_of

SUB = "Storybook Completion"


def picture(path: Path, colour: str = "red", fmt: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)
    return str(path)


def opening_record(uid: str, data_id: str, inputs: list, outputs: list) -> dict:
    return {"total_uid": uid, "meta_task_id": uid[:2].lstrip("0"), "meta_task_name": "Multimodal Content Completion",
            "subtask_id": uid[2:4].lstrip("0"), "subtask_name": SUB, "data_id": data_id,
            "conversations": [{"input": inputs}, {"output": outputs}]}


def opening(root: Path, extra: tuple[str, ...] = (), name: str = "test_data.jsonl") -> Path:
    """OpenING-benchmark/ with test_data.jsonl: a story with images after their texts; one opening on two images
    in a row (no text before them) with <BEGIN> in the middle of a later text; one with no input image; then
    the lines of `extra`."""
    bench = root / "OpenING-benchmark"
    img = f"./images/{SUB}"
    for n in ("96-i-1", "96-i-2", "96-o-1", "96-o-2", "97-i-1", "97-i-2", "97-o-1", "98-o-1"):
        picture(bench / "images" / SUB / f"{n}.jpg")
    records = [
        opening_record("0301096", "96", [
            {"image": f"{img}/96-i-1.jpg",
             "text": "Please complete the story. <BEGIN> One evening, George played. <image>"},
            {"image": f"{img}/96-i-2.jpg", "text": "He heard a sound. <image>"}], [
            {"image": f"{img}/96-o-1.jpg", "text": "He found a bird. <image>"},
            {"image": f"{img}/96-o-2.jpg", "text": "He helped it home.\nThe end. <image>"}]),
        opening_record("0301097", "97", [
            {"image": f"{img}/97-i-1.jpg", "text": "<image>"}, {"image": f"{img}/97-i-2.jpg", "text": ""},
            {"image": None, "text": "Continue these two pictures. <BEGIN> What happens next?"}], [
            {"image": f"{img}/97-o-1.jpg", "text": "A storm comes. <image>"}]),
        opening_record("0301098", "98", [{"image": None, "text": "<BEGIN> Draw a lighthouse."}],
                       [{"image": f"{img}/98-o-1.jpg", "text": "Here is one. <image>"}]),
    ]
    path = bench / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra))
    return path


ISG_GOLDEN = [{"type": "text", "content": "The hands are rinsed."}] + \
    [{"type": "image", "content": f"images/0000_g{k}.png"} for k in (1, 2)]


def isg(root: Path, extra: tuple[str, ...] = ()) -> Path:
    """ISG_eval/ISG-Bench.jsonl: a query of text then image (README's sample, shortened), and one of two images in
    a row then text, whose Golden starts with an image."""
    folder = root / "ISG_eval"
    for name in ("0000_q1", "0000_g1", "0000_g2", "0001_q1", "0001_q2", "0001_g1"):
        picture(folder / "images" / f"{name}.png", fmt="PNG")
    predict = {"structure": {"Query": ["<query_text1>", "<query_img1>"], "Answer": ["<gen_text1>", "<gen_img1>"]},
               "block_qa": {"questions": []}, "image_qa": {"questions": []}}
    records = [
        {"id": "0000", "Category": "Prediction", "Query": [
            {"type": "text", "content": "Show what happens next in 2 images."},
            {"type": "image", "content": "images/0000_q1.png"}], "Golden": ISG_GOLDEN, "predict": predict},
        {"id": "0001", "Category": "Art Style Transfer", "Query": [
            {"type": "image", "content": "images/0001_q1.png"}, {"type": "image", "content": "images/0001_q2.png"},
            {"type": "text", "content": "Paint the first in the style of the second."}],
         "Golden": [{"type": "image", "content": "images/0001_g1.png"}, {"type": "text", "content": "Done."}],
         "predict": predict},
    ]
    path = folder / "ISG-Bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra))
    return path


def mmie(root: Path, extra: list | None = None) -> Path:
    """MMIE's JSON list (README's format): an SA question of text then image with no reference text, an MSR one
    opening on an image with a reference answer, and `extra` records."""
    folder = root / "mmie"
    for n in range(3):
        picture(folder / "images" / f"{n}.png", fmt="PNG")
    records = [
        {"id": "SA_0", "question": [{"text": "What is shown?", "image": "images/0.png"}], "answer": [],
         "model": "gt", "gt_answer": [{"text": None, "image": None}]},
        {"id": "MSR_1", "question": [{"text": None, "image": "images/1.png"}, {"text": "Next step?", "image": None}],
         "answer": "", "model": "gt", "gt_answer": [{"text": "Turn it.", "image": "images/2.png"}]},
    ] + (extra or [])
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def prepared(tmp_path: Path, fmt: str, source: Path, *extra: str) -> list[dict]:
    assert run_cli("prepare-data", fmt, "--input", str(source), "--output", str(tmp_path / fmt), *extra) == 0
    return [json.loads(line) for line in (tmp_path / fmt / "stories.jsonl").read_text().splitlines()]


def summary(folder: Path) -> tuple[dict, list[dict]]:
    rejects = [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]
    return json.loads((folder / "summary.json").read_text()), rejects


# ---- reading


def test_opening_stories_keep_ids_tasks_reference_and_images(tmp_path):
    source = opening(tmp_path)
    stories = prepared(tmp_path, "opening", source.parent)
    raw = [json.loads(line) for line in source.read_text().splitlines()]
    assert [s["id"] for s in stories] == ["0301096", "0301097", "0301098"]
    first = stories[0]
    assert (first["benchmark"], first["split"], first["task"], first["category"]) == \
        ("opening", "test", SUB, "Multimodal Content Completion")
    img = f"images/{SUB}"
    assert first["steps"] == [
        {"text": "Please complete the story. One evening, George played.", "image": f"{img}/96-i-1.jpg"},
        {"text": "He heard a sound.", "image": f"{img}/96-i-2.jpg"}]
    assert first["reference"] == [
        {"type": "text", "text": "He found a bird."}, {"type": "image", "image": f"{img}/96-o-1.jpg"},
        {"type": "text", "text": "He helped it home.\nThe end."}, {"type": "image", "image": f"{img}/96-o-2.jpg"}]
    # two images before any text: steps of empty text; <BEGIN> in mid-text removed
    assert stories[1]["steps"] == [
        {"text": "", "image": f"{img}/97-i-1.jpg"}, {"text": "", "image": f"{img}/97-i-2.jpg"},
        {"text": "Continue these two pictures. What happens next?", "image": None}]
    assert [b["type"] for b in stories[1]["blocks"]] == ["image", "image", "text"]
    assert stories[2]["steps"] == [{"text": "Draw a lighthouse.", "image": None}]
    assert [s["source"] for s in stories] == raw  # verbatim
    out = tmp_path / "opening"
    for s in stories:  # every image path, the source's too, resolves in the prepared folder
        for step in s["source"]["conversations"][0]["input"] + s["source"]["conversations"][1]["output"]:
            assert step["image"] is None or (out / step["image"]).is_file()
    assert (out / img / "96-o-2.jpg").read_bytes() == (source.parent / img / "96-o-2.jpg").read_bytes()
    assert summary(out)[0]["kept"] == 3 and summary(out)[0]["split"] == "test"


def test_the_stories_are_what_generate_reads(tmp_path):
    from minigpt5_cli.generation.stories import read_stories

    raw = tmp_path / "raw"
    for fmt, source in (("opening", opening(raw)), ("isg", isg(raw)), ("mmie", mmie(raw))):
        stories = prepared(tmp_path, fmt, source)
        read = read_stories(str(tmp_path / fmt / "stories.jsonl"))
        assert [s.id for s in read] == [s["id"] for s in stories]
        for story, line in zip(read, stories):
            assert [(s.text, s.image.path.name if s.image else None) for s in story.steps] == \
                [(s["text"], Path(s["image"]).name if s["image"] else None) for s in line["steps"]]


def test_opening_split_picks_the_file_of_a_folder(tmp_path):
    dev = opening(tmp_path, name="dev_data.jsonl")
    (dev.parent / "test_data.jsonl").write_text(dev.read_text().replace("0301096", "0301099"))
    stories = prepared(tmp_path, "opening", dev.parent, "--split", "dev")
    assert stories[0]["id"] == "0301096" and stories[0]["split"] == "dev"


def test_isg_blocks_and_golden_are_kept_typed(tmp_path):
    stories = prepared(tmp_path, "isg", isg(tmp_path).parent)
    assert [(s["id"], s["task"]) for s in stories] == [("0000", "Prediction"), ("0001", "Art Style Transfer")]
    assert stories[0]["steps"] == [{"text": "Show what happens next in 2 images.", "image": "images/0000_q1.png"}]
    assert stories[1]["steps"] == [
        {"text": "", "image": "images/0001_q1.png"}, {"text": "", "image": "images/0001_q2.png"},
        {"text": "Paint the first in the style of the second.", "image": None}]
    assert stories[0]["reference"] == [{"type": "text", "text": "The hands are rinsed."},
                                       {"type": "image", "image": "images/0000_g1.png"},
                                       {"type": "image", "image": "images/0000_g2.png"}]


def test_mmie_task_from_the_id_and_null_texts(tmp_path):
    stories = prepared(tmp_path, "mmie", mmie(tmp_path / "raw").parent)
    assert [(s["id"], s["task"], s["category"]) for s in stories] == \
        [("SA_0", "SA", "Situational Analysis"), ("MSR_1", "MSR", "Multi-Step Reasoning")]
    assert stories[0]["reference"] == [] and stories[1]["steps"] == [{"text": "", "image": "images/1.png"},
                                                                      {"text": "Next step?", "image": None}]


BAD_OPENING = (
    "{not json",
    json.dumps({"total_uid": "0301100", "subtask_name": SUB, "meta_task_name": "M"}),  # no conversations
    json.dumps(opening_record("0301101", "101", [{"image": None, "text": 7}], [])),  # text not a string
    json.dumps(opening_record("0301102", "102", [{"image": "./images/none.jpg", "text": "<image>"}], [])),
    json.dumps(opening_record("0301103", "103", [{"image": "../secret.jpg", "text": "<image>"}], [])),
    json.dumps(opening_record("0301096", "96", [{"image": None, "text": "again"}], [])),  # duplicate id
    json.dumps(opening_record("0301104", "104", [{"image": None, "text": "<BEGIN> <image>"}], [])),  # nothing left
    json.dumps(opening_record("../0301105", "105", [{"image": None, "text": "a"}], [])),  # id not a file name
    json.dumps(opening_record("0301106", "106", [{"image": "./images/text.jpg", "text": "<image>"}], [])),
)


def test_bad_records_are_counted_and_listed(tmp_path):
    source = opening(tmp_path / "raw", BAD_OPENING)
    picture(tmp_path / "raw" / "secret.jpg")
    (source.parent / "images" / "text.jpg").write_text("not an image")
    stories = prepared(tmp_path, "opening", source)
    assert [s["id"] for s in stories] == ["0301096", "0301097", "0301098"]
    counts, rejects = summary(tmp_path / "opening")
    assert counts["rejected"] == {"corrupt_image": 1, "duplicate_id": 1, "empty_input": 1, "image_outside_root": 1,
                                  "malformed_json": 1, "malformed_record": 3, "missing_image": 1}
    assert [r["id"] for r in rejects][:3] == ["line4", "0301100", "0301101"]
    assert not (tmp_path / "opening" / "secret.jpg").exists()


def test_strict_stops_at_the_first_bad_record(tmp_path, capsys):
    source = opening(tmp_path / "raw", BAD_OPENING[3:])
    assert run_cli("prepare-data", "opening", "--input", str(source), "--output", str(tmp_path / "o"), "--strict") == 2
    assert capsys.readouterr().err.startswith("error: 0301102: missing image (./images/none.jpg); --strict stops here")
    assert not (tmp_path / "o").exists()


def test_outside_paths_when_allowed_go_to_external_and_the_source_follows(tmp_path):
    source = opening(tmp_path / "raw", (BAD_OPENING[4],))
    picture(tmp_path / "raw" / "secret.jpg")
    stories = prepared(tmp_path, "opening", source, "--allow-outside-paths")
    moved = stories[-1]["steps"][0]["image"]
    assert moved.startswith("external/") and moved.endswith("/secret.jpg")
    assert stories[-1]["source"]["conversations"][0]["input"][0]["image"] == moved
    assert (tmp_path / "opening" / moved).is_file()


def test_isg_records_whose_questions_judging_cannot_read_are_rejected(tmp_path):
    from minigpt5_cli.interleaved.isg import read_samples

    good = json.loads(isg(tmp_path / "raw").read_text().splitlines()[0])
    bad = [{**good, "id": "9000", "predict": 5}, {k: v for k, v in good.items() if k != "predict"} | {"id": "9001"},
           {**good, "id": "9002", "predict": {"block_qa": {"questions": "none"}}},
           {**good, "id": "9003", "predict": {"image_qa": {"questions": [{"id": 1, "Preliminary": 2}]}}}]
    exp = gold(tmp_path, "isg", isg(tmp_path / "raw", tuple(json.dumps(r) for r in bad)))
    counts, rejects = summary(tmp_path / "isg")
    assert counts["kept"] == 2 and counts["rejected"] == {"malformed_record": 4}
    assert [r["id"] for r in rejects] == ["9000", "9001", "9002", "9003"]
    assert [s["record"]["id"] for s in read_samples(exp / "gold.jsonl", tmp_path / "isg")] == ["0000", "0001"]


# ---- exporting


def opening_conversations_as_exported(record: dict) -> list:
    """What an export of the gold answers changes in OpenING's conversations: the output images renamed
    <uid>-o-<k>.jpg from 0, and the <image> markers taken out of the output texts (which are then stripped)."""
    conv = copy.deepcopy(record["conversations"])
    for k, step in enumerate(conv[1]["output"]):
        step["text"] = re.sub(r"\s*<image>\s*", " ", step["text"]).strip()
        step["image"] = f"{record['total_uid']}-o-{k}.jpg"
    return conv


def gold(tmp_path: Path, fmt: str, source: Path) -> Path:
    """The export folder of `source`'s reference answers as model "gold", prepared and exported under `tmp_path`."""
    prepared(tmp_path, fmt, source)
    assert run_cli("export", "--format", fmt, "--gold", "--data", str(tmp_path / fmt), "--name", "gold",
                   "--output", str(tmp_path / "exp")) == 0
    return tmp_path / "exp"


def test_opening_gold_round_trips(tmp_path):
    source = opening(tmp_path / "raw")
    out = gold(tmp_path, "opening", source) / "gold_output"
    for line in source.read_text().splitlines():
        record = json.loads(line)
        exported = json.loads((out / f"{record['total_uid']}.json").read_text())
        assert {k: v for k, v in exported.items() if k != "conversations"} == \
            {k: v for k, v in record.items() if k != "conversations"}
        assert exported["conversations"] == opening_conversations_as_exported(record)
        for step in exported["conversations"][1]["output"]:
            with Image.open(out / step["image"]) as img:
                assert img.format == "JPEG"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".jpg") == \
        ["0301096-o-0.jpg", "0301096-o-1.jpg", "0301097-o-0.jpg", "0301098-o-0.jpg"]


def test_arena_pairs_from_the_prepared_folder_equal_those_from_openings_file(tmp_path):
    source = opening(tmp_path / "raw")
    assert run_cli("prepare-data", "opening", "--input", str(source), "--output", str(tmp_path / "data")) == 0
    drawn = []
    for data in (source, tmp_path / "data"):
        out = tmp_path / f"pairs-{len(drawn)}.json"
        assert run_cli("arena", "sample", "--data", str(data), "--models", "A,B,C,D", "--seed", "3", "-o", str(out)) == 0
        drawn.append(json.loads(out.read_text()))
    assert drawn[0] == drawn[1] and len(drawn[0]) == 6


def structure(blocks: list[dict]) -> list[str]:
    return [b["type"] for b in blocks]


def test_isg_gold_export_passes_the_structure_check(tmp_path):
    source = isg(tmp_path / "raw")
    exp = gold(tmp_path, "isg", source)
    lines = [json.loads(line) for line in (exp / "gold.jsonl").read_text().splitlines()]
    originals = [json.loads(line) for line in source.read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "output"} for line in lines] == originals
    for line in lines:
        assert structure(line["output"]) == structure(line["Golden"])
        for block in line["output"] + line["Query"] + line["Golden"]:  # all found under EXP, ISG-eval.py's --root
            if block["type"] == "image":
                assert (exp / block["content"]).is_file(), block
    assert lines[0]["output"][1]["content"] == "gold_images/0000-o-0.png"


@pytest.mark.skipif(not os.environ.get("MINIGPT5_ORACLE_ISG"), reason="MINIGPT5_ORACLE_ISG names no ISG checkout")
def test_isg_gold_export_passes_isg_own_structure_check(tmp_path):
    evaluate_structure = isg_oracle(Path(os.environ["MINIGPT5_ORACLE_ISG"]))
    lines = [json.loads(line) for line in (gold(tmp_path, "isg", isg(tmp_path / "raw")) / "gold.jsonl").read_text()
             .splitlines()]
    assert all(evaluate_structure(copy.deepcopy(line)) for line in lines)
    lines[0]["output"].pop()
    assert not evaluate_structure(lines[0])


def isg_oracle(checkout: Path):
    """ISG-eval.py's evaluate_structure, imported from a checkout of ISG's repository (it needs openai, yaml and
    tqdm, and its own folder as the working directory)."""
    for package in ("openai", "yaml", "tqdm"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"ISG-eval.py needs {package}")
    here = os.getcwd()
    sys.path.insert(0, str(checkout))
    os.chdir(checkout)
    try:
        spec = importlib.util.spec_from_file_location("isg_eval_script", checkout / "ISG-eval.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.chdir(here)
        sys.path.remove(str(checkout))
    return module.evaluate_structure


def test_mmie_gold_export_is_mmie_input_with_answer_and_model(tmp_path):
    source = mmie(tmp_path / "raw")
    exp = gold(tmp_path, "mmie", source)
    records = json.loads((exp / "gold.json").read_text())
    originals = json.loads(source.read_text())
    assert [{k: v for k, v in r.items() if k not in ("answer", "model")} for r in records] == \
        [{k: v for k, v in r.items() if k not in ("answer", "model")} for r in originals]
    assert [r["model"] for r in records] == ["gold", "gold"]
    assert records[0]["answer"] == []
    assert records[1]["answer"] == [{"text": "Turn it.", "image": "gold_images/MSR_1-o-0.png"}]
    assert all((exp / q["image"]).is_file() for r in records for q in r["question"] if q["image"])


@pytest.mark.skipif(not os.environ.get("MINIGPT5_ORACLE_MMIE"), reason="MINIGPT5_ORACLE_MMIE names no MMIE checkout")
def test_mmie_own_loader_reads_the_export(tmp_path):
    """MMIE's dataset.get_dataset, pointed at the export folder as its --input_dir, finds every image."""
    checkout = Path(os.environ["MINIGPT5_ORACLE_MMIE"])
    spec = importlib.util.spec_from_file_location("mmie_dataset", checkout / "dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded = module.get_dataset(str(gold(tmp_path, "mmie", mmie(tmp_path / "raw"))), "gold.json")
    assert [(d["id"], d["model"], len(d["images"])) for d in loaded] == [("SA_0", "gold", 1), ("MSR_1", "gold", 2)]
    assert loaded[1]["answer"] == "Turn it.\nImage-1: <image>\n" and loaded[1]["gt_answer"] == "Turn it."


def generated(out: Path, sid: str, segments: list, inputs: list[str]) -> None:
    """A story folder as generate writes it: story.json and the images its segments name (PNGs)."""
    folder = out / sid
    folder.mkdir(parents=True)
    for seg in segments:
        if "image" in seg:
            picture(folder / seg["image"], "blue", "PNG")
    doc = {"id": sid, "input": [{"text": t, "image": None, "source": None} for t in inputs], "mode": "vokens",
           "generated": [{"text": "", "images": [s["image"] for s in segments if "image" in s], "segments": segments}]}
    (folder / "story.json").write_text(json.dumps(doc))


def test_opening_export_of_generated_answers(tmp_path, capsys):
    stories = prepared(tmp_path, "opening", opening(tmp_path / "raw"))
    out = tmp_path / "out"
    generated(out, "0301098", [{"image": "image-1.png"}, {"text": "A lighthouse."}, {"text": "At night."},
                               {"image": "image-2.png"}], ["Draw a lighthouse."])
    args = ["export", "--format", "opening", "--generated", str(out), "--data", str(tmp_path / "opening"),
            "--name", "MiniGPT-5", "--output", str(tmp_path / "exp")]
    assert run_cli(*args) == 2  # two stories have no answer
    assert "lack 2 stories of" in capsys.readouterr().err
    assert run_cli(*args, "--partial") == 0
    err = capsys.readouterr().err
    assert "warning:" in err
    assert "exporting the 1 there are; battles on the others cannot be judged" in err
    folder = tmp_path / "exp" / "MiniGPT-5_output"
    assert sorted(p.name for p in folder.iterdir()) == ["0301098-o-0.jpg", "0301098-o-1.jpg", "0301098.json"]
    doc = json.loads((folder / "0301098.json").read_text())
    assert doc["conversations"][0] == stories[2]["source"]["conversations"][0]
    assert doc["conversations"][1]["output"] == [{"text": "", "image": "0301098-o-0.jpg"},
                                                 {"text": "A lighthouse. At night.", "image": "0301098-o-1.jpg"}]
    with Image.open(folder / "0301098-o-0.jpg") as img:
        assert img.format == "JPEG"


def partial_export(tmp_path: Path, fmt: str, capsys) -> Path:
    """An isg or mmie export of answers to the first story only, with --partial; the warning checked."""
    stories = prepared(tmp_path, fmt, {"isg": isg, "mmie": mmie}[fmt](tmp_path / "raw"))
    generated(tmp_path / "out", stories[0]["id"], [{"text": "A cup."}, {"image": "image-1.png"}],
              [s["text"] for s in stories[0]["steps"]])
    capsys.readouterr()
    assert run_cli("export", "--format", fmt, "--generated", str(tmp_path / "out"), "--data", str(tmp_path / fmt),
                   "--name", "m", "--output", str(tmp_path / "exp"), "--partial") == 0
    out, err = capsys.readouterr()
    assert f"the first {stories[1]['id']!r}: writing 1 with an empty answer" in err
    assert "exported 2 stories (1 with no answer) of m" in out
    return tmp_path / "exp"


def test_partial_isg_export_writes_a_missing_answer_as_null_output(tmp_path, capsys):
    """ISG's scorer counts a sample without output as failed: it stays in the export, with "output": null."""
    from minigpt5_cli.interleaved.isg import Judge, read_samples

    exp = partial_export(tmp_path, "isg", capsys)
    lines = [json.loads(line) for line in (exp / "m.jsonl").read_text().splitlines()]
    assert [(line["id"], structure(line["output"] or [])) for line in lines] == [("0000", ["text", "image"]),
                                                                                ("0001", [])]
    assert lines[1]["output"] is None
    samples = read_samples(exp / "m.jsonl", None)  # the Query and Golden images of both linked into EXP
    never = Judge(lambda parts: pytest.fail("a sample without output was judged"), {}, False, "j")
    assert "result" not in never(samples[1])


def test_partial_mmie_export_writes_a_missing_answer_as_empty(tmp_path, capsys):
    records = json.loads((partial_export(tmp_path, "mmie", capsys) / "m.json").read_text())
    assert [(r["id"], r["model"]) for r in records] == [("SA_0", "m"), ("MSR_1", "m")]
    assert records[0]["answer"] == [{"text": "A cup.", "image": "m_images/SA_0-o-0.png"}]
    assert records[1]["answer"] == []
    oracle = os.environ.get("MINIGPT5_ORACLE_MMIE")
    if oracle:  # MMIE's own loader reads the empty answer as an empty text
        spec = importlib.util.spec_from_file_location("mmie_dataset", Path(oracle) / "dataset.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded = module.get_dataset(str(tmp_path / "exp"), "m.json")
        assert [(d["id"], d["answer"]) for d in loaded] == [("SA_0", "A cup.\nImage-1: <image>\n"), ("MSR_1", "")]


def edited(tmp_path: Path, change: Callable[[dict], None]) -> list[str]:
    """ISG prepared into {tmp}/d with its first story `change`d; the arguments of a gold export into {tmp}/x/exp."""
    assert run_cli("prepare-data", "isg", "--input", str(isg(tmp_path / "raw")), "--output", str(tmp_path / "d")) == 0
    path = tmp_path / "d" / "stories.jsonl"
    stories = [json.loads(line) for line in path.read_text().splitlines()]
    change(stories[0])
    path.write_text("".join(json.dumps(s) + "\n" for s in stories))
    return ["export", "--format", "isg", "--gold", "--data", str(tmp_path / "d"), "--name", "m", "--output",
            str(tmp_path / "x" / "exp")]


@pytest.mark.parametrize("key, path", [
    ("reference", "../d/images/0000_g1.png"),  # inside --data, but its link would land in {tmp}/x/d
    ("blocks", "/etc/passwd"),
    ("steps", "images/./0000_q1.png"),
    ("source", "../d/images/0000_q1.png"),
])
def test_export_refuses_a_prepared_image_path_leading_out(tmp_path, capsys, key, path):
    def change(story):
        if key == "source":
            story["source"]["Query"][1]["content"] = path
        else:
            next(b for b in story[key] if b.get("type", "image") == "image" and b["image"])["image"] = path

    args = edited(tmp_path, change)
    capsys.readouterr()
    assert run_cli(*args) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/d/stories.jsonl line 1: story '0000' names image "
                                              f"{path!r}: the folder was not written by prepare-data")
    assert not (tmp_path / "x").exists()


def test_generate_then_export_end_to_end(tmp_path):
    """The prepared ISG stories through generate on an untrained debug model, exported for ISG's scorer."""
    prepared(tmp_path, "isg", isg(tmp_path / "raw"))
    out = tmp_path / "out"
    assert run_cli("generate", "--story", str(tmp_path / "isg" / "stories.jsonl"), "--model",
                   str(DEBUG / "stage2_lora.yaml"), "--output", str(out), "--diffusion-steps", "2",
                   "--max-new-tokens", "12") == 0
    assert run_cli("export", "--format", "isg", "--generated", str(out), "--data", str(tmp_path / "isg"), "--name",
                   "m", "--output", str(tmp_path / "exp")) == 0
    lines = [json.loads(line) for line in (tmp_path / "exp" / "m.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["0000", "0001"]
    for line in lines:
        images = [b["content"] for b in line["output"] if b["type"] == "image"]
        assert images, "every response has an image (--min-images 1)"
        assert all((tmp_path / "exp" / p).is_file() and p.startswith("m_images/") for p in images)


def test_steps_of_blocks():
    text = lambda t: {"type": "text", "text": t}
    image = lambda p: {"type": "image", "image": p}
    assert steps_of([image("a"), image("b"), text("x"), text("y"), image("c"), text("")]) == [
        {"text": "", "image": "a"}, {"text": "", "image": "b"}, {"text": "x", "image": None},
        {"text": "y", "image": "c"}]
