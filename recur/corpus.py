"""Real text with no download: the Python standard library's source and reference prose, as bytes.

    corpus = load_corpus("code")            # every .py of this interpreter's stdlib (tests excluded)
    corpus = load_corpus("prose")           # the help topics of pydoc_data.topics (English)
    corpus = load_corpus("path/to/dir")     # a user's .txt/.md/.py/... files (or one file)
    corpus.split("validation").stream       # int16 [n]: BOS doc BOS doc ... (bytes 0-255, BOS = 256)
    corpus.sha256                            # identifies the text (it changes between Python versions)

Documents are files (the prose corpus: one help topic each; a user's files are cut into pieces of
about 64 KiB at line ends, so that a single file spreads over the splits). Each document belongs to one split,
decided by a sha256 of its name (its path relative to the corpus root), 80% train, 10% validation,
10% test, so a split never changes when other files are added or removed. The tokens are the
document's UTF-8 bytes, each document preceded by ``BOS`` (256): a model reading a split's stream
sees where every document begins (the text task resets the state there).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BOS = 256  # the token before every document (bytes are 0..255)
VOCAB_SIZE = 257
SPLIT_SHARES = (("train", 80), ("validation", 10), ("test", 10))  # percent of documents, by name hash
BUILTIN = ("code", "prose")
# Parts of the standard library that are not the library: its test suites (a third of the bytes,
# much of it generated data), the IDLE editor, the turtle demos, 2to3's fixers' test data, installed
# third-party packages, and the prose corpus (the topics module is one 460 KB string literal).
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "site-packages",
                           "dist-packages", "__pycache__", "pydoc_data", "ensurepip"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".tex", ".html", ".json", ".csv", ".c", ".h"})


@dataclass(frozen=True)
class Split:
    """One split of a corpus: its documents' names and the token stream they make."""

    name: str
    documents: tuple[str, ...]
    stream: torch.Tensor  # int16 [tokens]: BOS, then the document's bytes, for each document in name order

    @property
    def n_bytes(self) -> int:
        return int(self.stream.numel()) - len(self.documents)


@dataclass(frozen=True)
class Corpus:
    """A text corpus split by document, with the sha256 of its contents."""

    name: str
    sha256: str  # over the sorted (name, bytes) pairs: the same text gives the same hash anywhere
    splits: dict[str, Split]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ValueError(f"a corpus split is one of {sorted(self.splits)}, got {name!r}")
        return self.splits[name]

    @property
    def n_bytes(self) -> int:
        return sum(s.n_bytes for s in self.splits.values())


def split_of_name(name: str) -> str:
    """The split of the document called ``name``: a sha256 bucket of the name (0-99) against the shares."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    for split, share in SPLIT_SHARES:
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError("the split shares sum to 100")


def stdlib_sources() -> dict[str, bytes]:
    """Every .py file of this interpreter's standard library outside ``EXCLUDED_DIRS``, by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)  # pruned: site-packages can be huge
        for f in files:
            if f.endswith(".py"):
                path = Path(folder, f)
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return dict(sorted(out.items()))


def pydoc_topics() -> dict[str, bytes]:
    """The help topics of ``pydoc_data.topics`` (the language reference's prose), one document each."""
    from pydoc_data.topics import topics

    return {f"topics/{name}": text.encode("utf-8") for name, text in sorted(topics.items())}


USER_CHUNK = 1 << 16  # a user's file is cut into documents of about this many bytes, at line ends


def chunks(name: str, data: bytes, size: int = USER_CHUNK) -> dict[str, bytes]:
    """``data`` cut after the first newline at or past every ``size`` bytes, as ``name#0``, ``name#1``, ...
    (so that one long file still spreads over the three splits)."""
    out, start, k = {}, 0, 0
    while start < len(data):
        cut = data.find(b"\n", start + size - 1)
        end = len(data) if cut < 0 else cut + 1
        out[f"{name}#{k}"] = data[start:end]
        start, k = end, k + 1
    return out


def user_files(path: Path) -> dict[str, bytes]:
    """The text files under ``path`` (or the one file ``path``), by path relative to it, each cut into
    ``chunks`` (a user's corpus is often one file or a few)."""
    if path.is_file():
        return chunks(path.name, path.read_bytes())
    if not path.is_dir():
        raise ValueError(f"text corpus {str(path)!r}: expected 'code', 'prose', a text file or a folder of them, "
                         "got no such file or folder")
    files = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
            files.update(chunks(p.relative_to(path).as_posix(), p.read_bytes()))
    if not files:
        raise ValueError(f"text corpus {str(path)!r}: no text files (suffixes {sorted(TEXT_SUFFIXES)}) in it")
    return files


def _stream(names: list[str], documents: dict[str, bytes]) -> torch.Tensor:
    lengths = torch.tensor([len(documents[n]) + 1 for n in names], dtype=torch.int64)
    stream = torch.full((int(lengths.sum()),), BOS, dtype=torch.int16)
    is_byte = torch.ones(stream.shape, dtype=torch.bool)
    is_byte[lengths.cumsum(0) - lengths] = False  # each document's first slot holds its BOS
    text = b"".join(documents[n] for n in names)
    if text:
        stream[is_byte] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int16)
    return stream


def build_corpus(name: str, documents: dict[str, bytes]) -> Corpus:
    """Split ``documents`` (name -> bytes) by name hash and hash their contents."""
    digest = hashlib.sha256()
    for doc in sorted(documents):
        digest.update(doc.encode("utf-8") + b"\0" + len(documents[doc]).to_bytes(8, "big") + documents[doc])
    by_split: dict[str, list[str]] = {s: [] for s, _ in SPLIT_SHARES}
    for doc in sorted(documents):
        by_split[split_of_name(doc)].append(doc)
    empty = [s for s, names in by_split.items() if not names]
    if empty:
        counts = ", ".join(f"{s}: {len(names)}" for s, names in by_split.items())
        raise ValueError(f"text corpus {name!r}: {len(documents)} documents leave the {'/'.join(empty)} split "
                         f"empty ({counts}; documents are split 80/10/10 by a hash of their names): give more "
                         "text, or more files")
    splits = {s: Split(s, tuple(names), _stream(names, documents)) for s, names in by_split.items()}
    return Corpus(name, digest.hexdigest(), splits)


@functools.lru_cache(maxsize=4)
def load_corpus(name: str) -> Corpus:
    """``"code"``, ``"prose"``, or a path to a text file or folder (cached per process)."""
    if name == "code":
        return build_corpus(name, stdlib_sources())
    if name == "prose":
        return build_corpus(name, pydoc_topics())
    return build_corpus(name, user_files(Path(name)))


def encode(text: str) -> list[int]:
    """A document's tokens: BOS, then its UTF-8 bytes."""
    return [BOS, *text.encode("utf-8")]


def decode(tokens) -> str:
    """Text from tokens: BOS tokens dropped, invalid UTF-8 shown as U+FFFD."""
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")
