"""The offline text corpora: documents split by a hash of their names, streams of BOS + bytes, a
content sha256 that identifies the text, user files cut into documents."""

from __future__ import annotations

import hashlib

import pytest
import torch

from recur.corpus import (BOS, SPLIT_SHARES, VOCAB_SIZE, build_corpus, chunks, decode, encode, load_corpus,
                          split_of_name, stdlib_sources)


def _docs(n: int, size: int = 40) -> dict[str, bytes]:
    return {f"doc{i:03d}.txt": (f"document {i} " * size).encode()[:size] for i in range(n)}


def test_a_split_is_decided_by_the_name_alone_and_the_shares_are_80_10_10():
    names = [f"pkg/mod{i}.py" for i in range(4000)]
    splits = [split_of_name(n) for n in names]
    assert splits == [split_of_name(n) for n in names]  # deterministic
    for split, share in SPLIT_SHARES:
        assert abs(splits.count(split) / len(names) - share / 100) < 0.03
    # the split of a name does not depend on which other documents exist
    small, large = build_corpus("a", _docs(30)), build_corpus("b", _docs(300))
    for split, part in small.splits.items():
        assert set(part.documents) <= set(large.split(split).documents)


def test_splits_are_disjoint_and_cover_every_document_in_name_order():
    docs = _docs(200)
    corpus = build_corpus("t", docs)
    seen = [d for s in corpus.splits.values() for d in s.documents]
    assert sorted(seen) == sorted(docs) and len(seen) == len(set(seen))
    for split in corpus.splits.values():
        assert list(split.documents) == sorted(split.documents)


def test_the_stream_is_bos_then_the_bytes_of_each_document():
    docs = {"x": "héllo\n".encode(), "y": b"", "z": b"ab", **_docs(60)}
    corpus = build_corpus("t", docs)
    for split in corpus.splits.values():
        expected = []
        for name in split.documents:
            expected += [BOS, *docs[name]]
        assert split.stream.dtype == torch.int16
        assert split.stream.tolist() == expected
        assert split.n_bytes == len(expected) - len(split.documents)


def test_the_sha256_is_of_the_contents_and_changes_with_any_byte_or_name():
    docs = _docs(50)
    a = build_corpus("a", docs)
    assert a.sha256 == build_corpus("other name", dict(reversed(docs.items()))).sha256  # order does not matter
    changed = dict(docs, **{"doc000.txt": docs["doc000.txt"][:-1] + b"!"})
    renamed = {("z" + k if k == "doc001.txt" else k): v for k, v in docs.items()}
    assert len({a.sha256, build_corpus("a", changed).sha256, build_corpus("a", renamed).sha256}) == 3
    assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0


def test_a_corpus_too_small_for_three_splits_is_refused_clearly():
    with pytest.raises(ValueError, match="split empty.*give more text"):
        build_corpus("tiny", {"only.txt": b"hello"})


def test_chunks_cut_at_line_ends_and_rejoin_to_the_file():
    data = b"".join(f"line {i}\n".encode() for i in range(1000))
    parts = chunks("f.txt", data, size=100)
    assert b"".join(parts.values()) == data
    assert list(parts) == [f"f.txt#{k}" for k in range(len(parts))]
    assert all(p.endswith(b"\n") for p in parts.values())
    assert all(len(p) >= 100 for p in list(parts.values())[:-1]) and max(len(p) for p in parts.values()) < 110
    assert chunks("e.txt", b"") == {}
    assert chunks("n.txt", b"no newline at all", size=4) == {"n.txt#0": b"no newline at all"}


def test_a_user_folder_or_file_is_a_corpus(tmp_path):
    for i in range(60):
        (tmp_path / f"note{i}.md").write_text(f"# note {i}\n" + "text line\n" * 20)
    (tmp_path / "image.png").write_bytes(b"\x89PNG not text")
    corpus = load_corpus(str(tmp_path))
    names = {d for s in corpus.splits.values() for d in s.documents}
    assert names == {f"note{i}.md#0" for i in range(60)}  # the .png is not text
    big = tmp_path / "book.txt"
    big.write_text("".join(f"sentence {i} of a long book.\n" for i in range(40000)))  # ~1.2 MB: ~19 documents
    one = load_corpus(str(big))
    assert sum(len(s.documents) for s in one.splits.values()) > 10
    with pytest.raises(ValueError, match="no such file or folder"):
        load_corpus(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(str(empty))


def test_the_builtin_corpora_are_the_stdlib_source_and_the_pydoc_topics():
    code = load_corpus("code")
    names = [d for s in code.splits.values() for d in s.documents]
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "idlelib/", "site-packages/")) or "/test/" in n for n in names)
    assert code.n_bytes > 2_000_000  # megabytes of real code
    assert code.split("validation").n_bytes > 100_000 and code.split("test").n_bytes > 100_000
    sources = stdlib_sources()
    os_split = code.split(split_of_name("os.py"))
    start = 0
    for name in os_split.documents:
        if name == "os.py":
            break
        start += len(sources[name]) + 1
    assert bytes(os_split.stream[start + 1:start + 1 + len(sources["os.py"])].to(torch.uint8).tolist()) == \
        sources["os.py"]
    prose = load_corpus("prose")
    assert prose.n_bytes > 100_000 and prose.sha256 != code.sha256
    # the recorded hash is reproducible: the same files give it again
    digest = hashlib.sha256()
    for doc in sorted(sources):
        digest.update(doc.encode() + b"\0" + len(sources[doc]).to_bytes(8, "big") + sources[doc])
    assert digest.hexdigest() == code.sha256


def test_encode_and_decode():
    tokens = encode("déf f():\n")
    assert tokens[0] == BOS and max(tokens) < VOCAB_SIZE and len(tokens) == 1 + len("déf f():\n".encode())
    assert decode(tokens) == "déf f():\n"
    assert decode([BOS, 0xC3]) == "\ufffd"  # half a character: shown, not raised
    with pytest.raises(ValueError, match="split is one of"):
        load_corpus("prose").split("dev")
