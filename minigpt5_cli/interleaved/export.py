"""`minigpt5 export`: a model's answers to a prepared benchmark, written as the benchmark's own scorer reads them.

The answers come from a `generate` output folder (one folder per story, found by the id in its story.json:
every response's segments in order, adjacent texts joined), or, with `gold`, from the benchmark's reference
answers, exported as if a model had written them. Under EXP:

- opening: MODEL_output/<total_uid>.json, the input record with conversations[1].output replaced by the
  answer as steps [{"text", "image"}], each a text then at most one image, the images beside it as JPEGs
  <total_uid>-o-<k>.jpg, k from 0. Input image paths stay as in the record (found under the prepared folder).
- isg: MODEL.jsonl, each line the full record plus "output" [{"type": "text"|"image", "content"}].
- mmie: MODEL.json, MMIE's input list with "answer" ([{"text", "image"}]) and "model" filled.
For isg and mmie the answer images go to MODEL_images/<id>-o-<k>.<ext>, and the record's own images are linked
into EXP at their paths, so EXP is the folder their scripts are pointed at (ISG's --root, MMIE's --input_dir).

With --partial, a story without an answer is left out of an opening export (its battles cannot be judged), and
written with no answer to an isg ("output": null) or mmie ("answer": []) one, which their scorers count as failed
rather than leave out of the means.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

from rich.console import Console

from minigpt5_cli import files
from minigpt5_cli.display import plural
from minigpt5_cli.errors import UserError
from minigpt5_cli.generation.output import folder_name, read_record, story_folders
from minigpt5_cli.interleaved.formats import READERS, STORIES, link, plain_name, read_prepared, steps_of
from minigpt5_cli.story import STORY_FILE


def export(fmt: str, data: Path, name: str, output: Path, generated: Path | None = None, gold: bool = False,
           partial: bool = False, overwrite: bool = False, console: Console | None = None) -> str:
    """Write the export; returns the line to print."""
    console = console or Console(stderr=True)
    if fmt not in READERS:
        raise UserError(f"--format {fmt!r}: the choices are {', '.join(READERS)}")
    if (generated is None) == (not gold):
        raise UserError("give either --generated (a generate output folder) or --gold (the reference answers)")
    if not plain_name(name):
        raise UserError(f"--name {name!r}: a model's name is a file name here: letters, digits and . _ + - only")
    files.writable_folder(output, "--output")
    stories = read_prepared(data)
    other = next((s for s in stories if s["benchmark"] != fmt), None)
    if other is not None:
        raise UserError(f"{data / STORIES} holds {other['benchmark']} stories, not {fmt}")
    unnamed = next((s["id"] for s in stories if fmt == "opening" and not plain_name(s["id"])), None)
    if unnamed is not None:  # an OpenING id names its answer's file
        raise UserError(f"{data / STORIES}: story id {unnamed!r} is not a plain file name")
    targets = [output / f"{name}_output"] if fmt == "opening" else \
        [output / f"{name}.{'jsonl' if fmt == 'isg' else 'json'}", output / f"{name}_images"]
    there = next((t for t in targets if t.exists()), None)
    if there is not None and not overwrite:
        raise UserError(f"{there} exists; pass --overwrite to replace it")
    answers = {s["id"]: _gold(s, data) for s in stories if s["reference"] is not None} if gold else \
        _generated(generated, {s["id"]: s for s in stories})
    missing = [s["id"] for s in stories if s["id"] not in answers]
    where = "the reference answers" if gold else f"--generated {generated}"
    if missing and (not partial or not answers):
        hint = "; pass --partial to export those there are" if answers else ""
        raise UserError(f"{where} lack {plural(len(missing), 'story', 'stories')} of {data / STORIES}, the first "
                        f"{missing[0]!r}{hint}")
    if missing:  # ISG's and MMIE's scorers count an empty answer a failure; an OpenING battle needs both files
        said = f"writing {len(missing)} with an empty answer, which the scorer counts as failed" \
            if fmt != "opening" else f"exporting the {len(answers)} there are; battles on the others cannot be judged"
        console.print(f"[yellow]warning:[/] {where} lack {plural(len(missing), 'story', 'stories')}, the first "
                      f"{missing[0]!r}: {said}", highlight=False, soft_wrap=True)
    done = [(s, answers.get(s["id"])) for s in stories if s["id"] in answers or fmt != "opening"]
    output.mkdir(parents=True, exist_ok=True)
    if fmt != "opening":
        _link_inputs(done, data, output)
    with files.staged(targets[-1], replace=overwrite) as tmp:
        if fmt == "opening":
            for s, blocks in done:
                record = _opening(s, _place(blocks, s["id"], tmp, jpeg=True))
                (tmp / f"{s['id']}.json").write_text(json.dumps(record, indent=4, ensure_ascii=False))
        else:
            records = []
            for s, blocks in done:
                placed = None if blocks is None else _place(blocks, folder_name(s["id"]), tmp, f"{name}_images/")
                records.append(_isg(s, placed) if fmt == "isg" else _mmie(s, placed, name))
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if fmt == "isg" else \
                json.dumps(records, indent=4, ensure_ascii=False)
            files.write_atomic({targets[0]: lambda f: f.write(text)})
    empty = f" ({len(done) - len(answers)} with no answer)" if len(done) > len(answers) else ""
    return f"exported {plural(len(done), 'story', 'stories')}{empty} of {name} to {targets[0]}"


def _gold(story: dict, data: Path) -> list[dict]:
    """The story's reference answer, its images as files under `data`."""
    return [{**b, "image": _in(data, b["image"], f"story {story['id']!r}")} if b["type"] == "image" else b
            for b in story["reference"]]


def _in(folder: Path, name: str, where: str) -> Path:
    path = folder / name
    if not files.inside(path, folder) or not path.is_file():
        raise UserError(f"{where}: its image {name!r} is not a file in {folder}")
    return path


def _generated(out: Path, stories: dict[str, dict]) -> dict[str, list[dict]]:
    """{story id: its answer as typed blocks} from a generate output folder: every response's segments in order,
    adjacent texts joined, images as files of the story's folder."""
    if not out.is_dir():
        raise UserError(f"--generated {out} is not a folder generate wrote")
    answers, seen = {}, {}
    for folder in story_folders(out):
        doc = read_record(folder)
        if not doc or doc["id"] not in stories:
            continue
        sid = doc["id"]
        if not files.inside(folder, out):
            raise UserError(f"{folder} leads outside --generated {out}")
        if sid in seen:
            raise UserError(f"story {sid!r} is in both {seen[sid]} and {folder}")
        seen[sid] = folder
        if [s.get("text") for s in doc["input"]] != [s["text"].strip() for s in stories[sid]["steps"]]:
            raise UserError(f"{folder / STORY_FILE} continues another input than story {sid!r}: generate it from "
                            f"the prepared {STORIES}")
        blocks = []
        for response in doc["generated"]:
            for seg in response.get("segments") or []:
                if isinstance(seg, dict) and isinstance(seg.get("image"), str):
                    blocks.append({"type": "image", "image": _in(folder, seg["image"], str(folder / STORY_FILE))})
                elif isinstance(seg, dict) and isinstance(seg.get("text"), str) and seg["text"]:
                    if blocks and blocks[-1]["type"] == "text":
                        blocks[-1]["text"] += " " + seg["text"]
                    else:
                        blocks.append({"type": "text", "text": seg["text"]})
        answers[sid] = blocks
    return answers


def _place(blocks: list[dict], stem: str, folder: Path, prefix: str = "", jpeg: bool = False) -> list[dict]:
    """`blocks` with their images written into `folder` as <stem>-o-<k> (k from 0), each named `prefix` + its file
    name; `jpeg`: as JPEG files (copied as they are when they are JPEGs already)."""
    out, k = [], 0
    for block in blocks:
        if block["type"] == "text":
            out.append(block)
            continue
        src = block["image"]
        name = f"{stem}-o-{k}{'.jpg' if jpeg else src.suffix.lower()}"
        if jpeg and src.read_bytes()[:3] != b"\xff\xd8\xff":  # not a JPEG file already
            from minigpt5_cli import images

            images.decode(src, str(src)).save(folder / name, format="JPEG", quality=95)
        else:
            shutil.copyfile(src, folder / name)
        out.append({"type": "image", "image": prefix + name})
        k += 1
    return out


def _link_inputs(done: list[tuple[dict, list]], data: Path, output: Path) -> None:
    """The records' own images (input and reference), linked into `output` at their paths in `data` once all are
    checked."""
    new = {}
    for s, _ in done:
        for block in s["blocks"] + (s["reference"] or []):
            if block["type"] != "image":
                continue
            src, dst = _in(data, block["image"], f"story {s['id']!r}"), output / block["image"]
            if not files.inside(dst, output):  # a folder of `output` linked elsewhere
                raise UserError(f"{dst} leads outside --output {output}; export into another folder")
            if not dst.exists():
                new[dst] = src
            elif not filecmp.cmp(src, dst, shallow=False):
                raise UserError(f"{dst} is not the image of {data} at that path; export into another folder")
    for dst, src in new.items():
        link(src, dst)


def _opening(story: dict, blocks: list[dict]) -> dict:
    record = dict(story["source"])
    conv = list(record["conversations"])
    output = {"output": [{"text": s["text"], "image": s["image"]} for s in steps_of(blocks)]}
    record["conversations"] = conv[:1] + [output] + conv[2:]
    return record


def _isg(story: dict, blocks: list[dict] | None) -> dict:
    """ISG's record with the answer as its "output"; none (null) where there is no answer, as ISG-eval.py leaves
    unjudged and calculate_performance.py scores as failed."""
    output = None if blocks is None else [{"type": b["type"], "content": b[b["type"]]} for b in blocks]
    return {**story["source"], "output": output}


def _mmie(story: dict, blocks: list[dict] | None, name: str) -> dict:
    answer = [{"text": s["text"] or None, "image": s["image"]} for s in steps_of(blocks or [])]
    return {**story["source"], "answer": answer, "model": name}
