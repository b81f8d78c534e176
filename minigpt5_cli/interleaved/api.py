"""A small client for OpenAI-compatible chat endpoints (a local vLLM server, a hosted API), on the standard
library alone: one user message of text and images (as data URLs), greedy, the reply's text back. Also what
the judge commands share: a benchmark's own prompt strings read from its checkout, and a resumable run."""

from __future__ import annotations

import ast
import base64
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from rich.console import Console

from minigpt5_cli import display
from minigpt5_cli.errors import UserError
from minigpt5_cli.files import parse_json, writable_file

RETRIES = 3  # tries after the first, on a server error (5xx) or a lost connection
TIMEOUT = 600.0  # seconds for one answer: a large judge on a busy server is slow
MAX_IMAGE = 32 * 2**20  # bytes of one image sent; a benchmark's images are well under a megabyte

# The leading bytes of the image formats chat endpoints take.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"))


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(path: Path, detail: str | None = None) -> dict:
    """An image_url part holding the file as a data URL; `detail` as OpenAI's API takes it (low, high)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_IMAGE:
        raise UserError(f"{path} is too large to send (over {MAX_IMAGE // 2**20} MiB)")
    kind = next((k for magic, k in _MAGIC if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        raise UserError(f"{path} is not a PNG, JPEG, GIF or WebP image")
    url = {"url": f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"}
    return {"type": "image_url", "image_url": {**url, "detail": detail} if detail else url}


class _Refuse(urllib.request.HTTPRedirectHandler):
    """A redirect is refused rather than followed: following it would send the key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise UserError(f"--api answered a redirect to {newurl}; give the final URL")


class Chat:
    """`Chat(api, model)(parts)`: the text of the model's answer to one user message."""

    def __init__(self, api: str, model: str, key_env: str | None = None, json_mode: bool = False,
                 max_tokens: int | None = None, timeout: float = TIMEOUT, retries: int = RETRIES, wait: float = 2.0):
        self.url = api.rstrip("/") + "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise UserError(f"--api {api!r} is not an http:// or https:// URL")
        self.model, self.json_mode, self.max_tokens = model, json_mode, max_tokens
        self.timeout, self.retries, self.wait = timeout, retries, wait
        self.headers = {"Content-Type": "application/json"}
        self.opener = urllib.request.build_opener(_Refuse)
        key = os.environ.get(key_env) if key_env else None
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def __call__(self, parts: list[dict]) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": parts}], "temperature": 0}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        request = urllib.request.Request(self.url, json.dumps(body).encode(), self.headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    return self._text(response.read(), response.status)
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    detail = e.read(300).decode("utf-8", "replace").replace("\n", " ").strip()
                    raise UserError(f"{self.url} answered {e.code} {e.reason}" + (f": {detail}" if detail else "")) \
                        from None
                failure = f"{self.url} answered {e.code} {e.reason}"
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                failure = f"cannot reach {self.url}: {getattr(e, 'reason', None) or e}"
            if attempt < self.retries:
                time.sleep(self.wait * 2**attempt)
        raise UserError(f"{failure} (tried {self.retries + 1} times)")

    def _text(self, raw: bytes, status: int) -> str:
        try:
            reply = json.loads(raw)
            text = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{self.url} answered {status} with no chat completion in it (not OpenAI-compatible?)") \
                from None
        return text if isinstance(text, str) else ""


# ---- what the judge commands share: the benchmark's own strings, and a resumable run of many requests


def source_strings(tree: ast.Module) -> dict:
    """The module-level string constants of a Python file's syntax tree (`files.python_tree`: never run):
    {name: value} for each plain assignment of a string, a list of strings or a dict of strings to strings."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            if _strings(value):
                found[node.targets[0].id] = value
    return found


def _strings(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


def export_files(exports: list[Path], suffix: str, skip: Path, is_export: Callable[[Path], bool] | None = None) \
        -> list[Path]:
    """The export files named by --exports: files as given, folders for their files ending in `suffix` (those
    `is_export` takes, when given: a folder may also hold judgements; how many were left is said)."""
    files = []
    for path in exports:
        if path.is_dir():
            found = sorted(p for p in path.glob(f"*{suffix}") if p.is_file() and p.resolve() != skip.resolve())
            kept = [p for p in found if is_export(p)] if is_export else found
            if not kept:
                raise UserError(f"--exports {path} holds no {suffix} export")
            if len(kept) < len(found):
                skipped = display.plural(len(found) - len(kept), "file")
                Console(stderr=True).print(f"note: --exports {path}: {skipped} that are not exports skipped",
                                           highlight=False, markup=False, soft_wrap=True)
            files += kept
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--exports {path} not found")
    return files


def resume(output: Path, lead: bytes, check: Callable[[str, object], object]) -> set:
    """The keys of the judgements `output` already holds (a rerun skips them): `check(where, record)` returns
    a line's key or raises UserError when it is not a judgement; every line starts with `lead`. The last line
    after the last newline, if any, is a judgement whose newline was not written (it gets one), or one cut
    short by a kill (the start of `lead`, or more: it is removed and judged again); anything else is refused
    and the file left as it is."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    cut = data.rfind(b"\n") + 1
    try:
        text, tail = data[:cut].decode("utf-8"), data[cut:].decode("utf-8", "replace")
    except UnicodeDecodeError:
        raise UserError(f"{output} is not UTF-8 text") from None
    keys, lines = set(), text.split("\n")[:-1]  # not splitlines: a judge's text may hold U+2028, kept as it is
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{output} line {number}"
            keys.add(check(where, parse_json(line, where, position=False)))
    if not tail.strip():
        return keys
    where = f"{output} line {len(lines) + 1}"
    try:
        record = json.loads(tail)
    except (ValueError, RecursionError):
        record = None
    if record is not None:
        keys.add(check(where, record))
        with output.open("ab") as f:
            f.write(b"\n")
    elif data[cut:].startswith(lead) or lead.startswith(data[cut:].rstrip()):
        with output.open("r+b") as f:
            f.truncate(cut)
    else:
        raise UserError(f"{output} does not end with a judgement (nor one cut short); give another --output")
    return keys


def done(output: Path, lead: bytes, check: Callable[[str, object], object]) -> set:
    """`resume`, once `output` is checked to be a JSON Lines file that can be written."""
    if output.suffix != ".jsonl":
        raise UserError(f"--output {output}: name it .jsonl (JSON Lines: the judgements are read by that name)")
    writable_file(output, "--output")
    return resume(output, lead, check)


def judgement(output: Path, benchmark: str, keys: tuple[str, ...]) -> Callable[[str, object], tuple]:
    """A `check` for `resume`: a judgement is an object holding `keys`; its key is (model, id)."""

    def check(where: str, record) -> tuple:
        if not (isinstance(record, dict) and all(k in record for k in keys)
                and isinstance(record["model"], str) and isinstance(record["id"], str)):
            raise UserError(f"{output} is not a judgement file of {benchmark}; give another --output ({where} is "
                            "not one)")
        return record["model"], record["id"]

    return check


def judge_all(jobs: list, judge: Callable[[object], dict], output: Path, workers: int, what: str) -> None:
    """`judge(job)` for every job, `workers` requests at a time; each judgement is appended to `output` as one
    JSON line as soon as it is back, so an interrupted run loses only the ones in flight. When a request
    fails, those not started are dropped, those in flight still written, and the first failure raised."""
    output.parent.mkdir(parents=True, exist_ok=True)
    failure = None
    with (open(output, "a", encoding="utf-8") as f, ThreadPoolExecutor(workers) as pool,
          display.progress(Console(stderr=True)) as bar):
        task = bar.add_task(what, total=len(jobs), unit=what)
        futures = [pool.submit(judge, job) for job in jobs]
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as e:  # noqa: BLE001 (raised below, once the answers back are written)
                    failure = failure or e
                    for other in futures:
                        other.cancel()
                    continue
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
                f.flush()
                bar.advance(task)
        finally:
            for future in futures:
                future.cancel()
    if failure is not None:
        raise failure
