"""WordNet 3.0 for METEOR: found locally (NLTK's data, Debian's package, or a folder given) and made
readable to NLTK, which reads only from its own data roots and needs a `lexnames` file that
Debian's wordnet-base does not ship."""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from minigpt5_cli.errors import UserError


# WordNet 3.0's lexicographer files, in number order: NLTK reads them from a `lexnames` file that
# Debian's wordnet-base package does not ship.
_LEXNAMES = """adj.all 3|adj.pert 3|adv.all 4|noun.Tops 1|noun.act 1|noun.animal 1|noun.artifact 1|
noun.attribute 1|noun.body 1|noun.cognition 1|noun.communication 1|noun.event 1|noun.feeling 1|noun.food 1|
noun.group 1|noun.location 1|noun.motive 1|noun.object 1|noun.person 1|noun.phenomenon 1|noun.plant 1|
noun.possession 1|noun.process 1|noun.quantity 1|noun.relation 1|noun.shape 1|noun.state 1|noun.substance 1|
noun.time 1|verb.body 2|verb.change 2|verb.cognition 2|verb.communication 2|verb.competition 2|
verb.consumption 2|verb.contact 2|verb.creation 2|verb.emotion 2|verb.motion 2|verb.perception 2|
verb.possession 2|verb.social 2|verb.stative 2|verb.weather 2|adj.ppl 3"""
_WORDNET_FILES = [f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")]
_WORDNET_FILES.append("index.sense")  # NLTK maps sense keys with it
DEBIAN_WORDNET = "/usr/share/wordnet"
WORDNET_HELP = ("METEOR needs the WordNet 3.0 database: install Debian's wordnet-base and wordnet-sense-index "
                "packages, or run `python -m nltk.downloader wordnet`, or pass a WordNet dict folder with --wordnet")


def _cache() -> Path:
    return Path(os.environ.get("MINIGPT5_CACHE", Path.home() / ".cache" / "minigpt5"))


@functools.lru_cache(maxsize=4)  # reading the database takes seconds; the reader is only read from
def load_wordnet(folder: str | Path | None = None):
    """A WordNet 3.0 reader for METEOR.

    `folder` is a WordNet dict folder (`index.noun`, `data.noun`, ...; Debian's is
    /usr/share/wordnet). NLTK reads only from its data roots, in private folders, and needs a
    `lexnames` file, so the folder is copied once into the cache with one added. Without `folder`:
    NLTK's own `wordnet` corpus if downloaded, else Debian's folder. Raises `UserError` when none is
    found: METEOR without synonym matching would be a different metric."""
    import nltk

    if folder is None:
        try:
            return _wordnet_reader(nltk.data.find("corpora/wordnet"))
        except LookupError:
            folder = DEBIAN_WORDNET
    source = Path(folder)
    missing = [f for f in _WORDNET_FILES if not (source / f).is_file()]
    if missing:
        raise UserError(f"no WordNet database in {source} (missing {', '.join(missing[:3])}); {WORDNET_HELP}")
    # NLTK maps synsets against the corpus named `wordnet`: one data root per source folder.
    root = _cache() / "nltk_data" / re.sub(r"\W+", "_", str(source.resolve())).strip("_")
    target = root / "corpora" / "wordnet"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)  # 0o755 under the usual umask: NLTK needs it private
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        for f in source.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)  # NLTK refuses links that lead out of its data roots
        if not (tmp / "lexnames").is_file():
            lines = [f"{i:02d}\t{n.split()[0]}\t{n.split()[1]}\n" for i, n in enumerate(_LEXNAMES.split("|"))]
            (tmp / "lexnames").write_text("".join(lines))
        tmp.chmod(0o755)  # NLTK refuses folders that others can write to
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return _wordnet_reader(nltk.data.FileSystemPathPointer(target))


def _wordnet_reader(pointer):
    from nltk.corpus.reader import WordNetCorpusReader

    with warnings.catch_warnings():  # "multilingual functions are not available": METEOR needs none
        warnings.simplefilter("ignore")
        try:
            reader = WordNetCorpusReader(pointer, None)
        except (OSError, ValueError, LookupError) as e:
            raise UserError(f"cannot read WordNet from {pointer} ({e}); {WORDNET_HELP}") from None
    if reader.get_version() != "3.0":
        raise UserError(f"WordNet in {pointer} is version {reader.get_version()}, not 3.0; {WORDNET_HELP}")
    return reader
