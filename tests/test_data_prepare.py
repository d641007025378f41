"""prepare + loader, one process: text -> tokens -> MDS shards -> loader -> text for every corpus format,
the train/val split, determinism across worker counts, and one clear error for each kind of bad input."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import data_make_documents

from titans_scale.data import DataConfig, DataError, Tokenizer, build_train_loader, build_val_loader, check_shards
from titans_scale.data.prepare import in_val_split, prepare, read_metadata
from titans_scale.data.tokenizer import train_tokenizer

SEQ = 32


def data_write_corpus(fmt: str, docs: list[str], root: Path) -> str:
    """The documents as a corpus of the given format (split over files, in order); returns its glob."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    parts = [docs[:half], docs[half:]]
    if fmt == "parquet":  # the FineWeb schema
        for p, part in enumerate(parts):
            n = len(part)
            table = pa.table(
                {
                    "text": part,
                    "id": [f"<urn:uuid:{p}-{i}>" for i in range(n)],
                    "dump": ["CC-MAIN-2024-10"] * n,
                    "url": [f"https://example.org/{p}/{i}" for i in range(n)],
                    "date": ["2024-02-20T10:00:00Z"] * n,
                    "language": ["en"] * n,
                    "language_score": [0.93] * n,
                    "token_count": [len(t.split()) for t in part],
                }
            )
            pq.write_table(table, root / f"part-{p}.parquet")
    elif fmt == "jsonl":  # one plain and one gzipped file
        lines = [[json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(part)] for part in parts]
        (root / "a.jsonl").write_text("".join(lines[0]), encoding="utf-8")
        with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write("".join(lines[1]))
    elif fmt == "txt":  # one document per file, bytes kept exactly (\r\n included)
        for i, text in enumerate(docs):
            with open(root / f"doc{i:04d}.txt", "w", encoding="utf-8", newline="") as f:
                f.write(text)
    return str(root / "*")


def data_stream(loader) -> list[int]:
    return [int(t) for batch in loader for t in batch.reshape(-1)]


def data_split_documents(tokens: list[int], tok: Tokenizer) -> tuple[list[str], list[int]]:
    """Complete documents decoded from an eos-separated stream, and the tokens after the last eos."""
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == tok.eos_id:
            docs.append(tok.decode(tokens[start:i]))
            start = i + 1
    return docs, tokens[start:]


@pytest.fixture(scope="module")
def data_docs() -> list[str]:
    return data_make_documents(60, seed=5)


@pytest.fixture(scope="module")
def data_prepared(tmp_path_factory, data_docs, data_tokenizer_path) -> Path:
    root = tmp_path_factory.mktemp("data_prepared")
    corpus = data_write_corpus("jsonl", data_docs, root / "corpus")
    prepare(corpus, data_tokenizer_path, SEQ, root / "shards", val_fraction=0.2, seed=3, progress=False)
    return root / "shards"


def data_cfg(data_dir, tokenizer, **kw) -> DataConfig:
    return DataConfig(data_dir=str(data_dir), tokenizer=str(tokenizer), seq_len=SEQ, num_workers=0, **kw)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "txt", "parquet-remote"])
def test_round_trip_text_to_shards_to_loader_to_text(tmp_path, fmt, data_docs, data_tokenizer_path):
    tok = Tokenizer(data_tokenizer_path)
    corpus = data_write_corpus(fmt.split("-")[0], data_docs, tmp_path / "corpus")
    meta = prepare(corpus, tok, SEQ, tmp_path / "shards", val_fraction=0.0, progress=False)
    assert meta["dtype"] == "uint16" and meta["seq_len"] == SEQ and set(meta["splits"]) == {"train"}
    assert meta["tokenizer"]["sha256"] == tok.sha256 and meta["source"]["documents"] == len(data_docs)
    expected = [t for d in data_docs for t in tok.encode(d) + [tok.eos_id]]
    n = meta["splits"]["train"]["sequences"]
    assert n == len(expected) // SEQ and meta["splits"]["train"]["dropped_tokens"] == len(expected) % SEQ

    if fmt.endswith("remote"):  # shards read from a "remote" location into a separate cache directory
        cfg = DataConfig(remote=str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"), tokenizer=data_tokenizer_path, seq_len=SEQ, num_workers=0, shuffle=False)
    else:
        cfg = data_cfg(tmp_path / "shards", tok.path, shuffle=False)
    loader = build_train_loader(cfg, micro_batch=1, dp_rank=0, dp_size=1)
    batches = list(loader)
    assert len(batches) == n and all(b.shape == (1, SEQ) and b.dtype == torch.int64 for b in batches)
    stream = data_stream(batches)
    assert stream == expected[: n * SEQ]
    docs, tail = data_split_documents(stream, tok)
    assert docs == data_docs[: len(docs)] and len(docs) >= len(data_docs) - 2
    assert tok.encode(data_docs[len(docs)])[: len(tail)] == tail  # the cut-off document starts right
    if fmt.endswith("remote"):
        assert (tmp_path / "cache" / "train" / "index.json").exists() and not (tmp_path / "shards" / "train" / "shard.00000.mds").exists()


def test_split_is_by_document_hash_and_loaders_read_both(data_prepared, data_docs, data_tokenizer_path):
    tok = Tokenizer(data_tokenizer_path)
    meta = read_metadata(data_prepared)
    is_val = [in_val_split(d, 0.2, 3) for d in data_docs]
    assert 0 < sum(is_val) < len(data_docs)
    assert meta["splits"]["val"]["documents"] == sum(is_val) and meta["splits"]["train"]["documents"] == len(data_docs) - sum(is_val)
    cfg = data_cfg(data_prepared, data_tokenizer_path, shuffle=False)
    for split, loader in (("train", build_train_loader(cfg, micro_batch=2, dp_rank=0, dp_size=1)), ("val", build_val_loader(cfg, micro_batch=2, dp_rank=0, dp_size=1))):
        epoch = list(loader)
        docs, _ = data_split_documents(data_stream(epoch), tok)
        want = [d for d, v in zip(data_docs, is_val) if v == (split == "val")]
        assert docs == want[: len(docs)] and len(docs) >= len(want) - 2
    batches = loader.endless()  # epoch after epoch (val: not shuffled, so the same order again)
    again = [next(batches) for _ in range(len(epoch) + 1)]
    assert all(torch.equal(a, b) for a, b in zip(again, epoch + epoch[:1]))


def test_same_shards_with_one_or_two_workers_and_max_tokens(tmp_path, data_docs, data_tokenizer_path, capsys):
    corpus = data_write_corpus("parquet", data_docs * 3, tmp_path / "corpus")
    one = prepare(corpus, data_tokenizer_path, SEQ, tmp_path / "w1", workers=1, val_fraction=0.1, progress=False)
    two = prepare(corpus, data_tokenizer_path, SEQ, tmp_path / "w2", workers=2, val_fraction=0.1, progress=True)
    assert "prepare: " in capsys.readouterr().err  # the closing progress line: docs, tokens, tok/s
    assert one["splits"] == two["splits"]
    for split in ("train", "val"):
        index1 = json.loads((tmp_path / "w1" / split / "index.json").read_text())
        index2 = json.loads((tmp_path / "w2" / split / "index.json").read_text())
        assert [s["raw_data"]["hashes"] for s in index1["shards"]] == [s["raw_data"]["hashes"] for s in index2["shards"]]
    capped = prepare(corpus, data_tokenizer_path, SEQ, tmp_path / "cap", max_tokens=10 * SEQ + 5, val_fraction=0, progress=False)
    assert capped["splits"]["train"]["sequences"] == 10


# ------------------------------------------------------------------------------------------ bad input
def data_prepare_error(corpus, tokenizer, out: Path) -> str:
    with pytest.raises(DataError) as info:
        prepare(corpus, tokenizer, SEQ, out, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))  # nothing half-written left
    return message


def test_bad_corpus_files_raise_one_clear_error(tmp_path, data_tokenizer_path):
    out = tmp_path / "out"
    pq.write_table(pa.table({"content": ["no text column here"]}), tmp_path / "notext.parquet")
    assert data_prepare_error(str(tmp_path / "notext.parquet"), data_tokenizer_path, out) == (
        f"corpus file {tmp_path / 'notext.parquet'} has no 'text' column (columns: content); FineWeb-style parquet needs the document text in 'text'"
    )
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert data_prepare_error(str(tmp_path / "empty.jsonl"), data_tokenizer_path, out).startswith(f"corpus file {tmp_path / 'empty.jsonl'} is empty")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    assert f"corpus file {tmp_path / 'junk.parquet'} is not a readable parquet file" in data_prepare_error(str(tmp_path / "junk.parquet"), data_tokenizer_path, out)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert data_prepare_error(str(tmp_path / "latin1.txt"), data_tokenizer_path, out) == (
        f"corpus file {tmp_path / 'latin1.txt'} line 1 is not UTF-8 text (byte 4 of the line: b'\\xe9')")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "holds no documents" in data_prepare_error(str(tmp_path / "blank.jsonl"), data_tokenizer_path, out)
    assert data_prepare_error(str(tmp_path / "nope" / "*.parquet"), data_tokenizer_path, out).startswith("no corpus files match")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    assert "unsupported file type" in data_prepare_error(str(tmp_path / "table.csv"), data_tokenizer_path, out)
    # an error found late (second file, after the first was tokenized and written) leaves nothing behind
    late = tmp_path / "late"
    late.mkdir()
    (late / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in data_make_documents(30)))
    (late / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    assert data_prepare_error(str(late), data_tokenizer_path, out) == f"corpus file {late / 'b.jsonl'} line 2 is not valid JSON (Expecting value)"
    assert data_prepare_error(str(late / "a.jsonl"), tmp_path / "no.model", out).startswith(f"tokenizer {tmp_path / 'no.model'} does not exist")


def test_cli_error_is_one_line_exit_2(tmp_path, data_tokenizer_path):
    (tmp_path / "empty.txt").write_text("")
    cmd = [sys.executable, "-m", "titans_scale.data.prepare", "--corpus", str(tmp_path / "empty.txt"), "--tokenizer", data_tokenizer_path, "--seq-len", "8", "--out", str(tmp_path / "o")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr == f"error: corpus file {tmp_path / 'empty.txt'} is empty (0 bytes); remove it or fix the download\n"


def test_corrupt_shards_and_wrong_tokenizer_raise_one_clear_error(tmp_path, data_prepared, data_docs, data_tokenizer_path):
    def error(data_dir, tokenizer=data_tokenizer_path) -> str:
        with pytest.raises(DataError) as info:
            build_train_loader(data_cfg(data_dir, tokenizer), micro_batch=1, dp_rank=0, dp_size=1)
        assert "\n" not in str(info.value)
        return str(info.value)

    flipped = tmp_path / "flipped"
    shutil.copytree(data_prepared, flipped)
    shard = flipped / "train" / "shard.00000.mds.zstd"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert error(flipped) == f"shard file {shard} is corrupt: its xxh64 checksum does not match {flipped / 'train' / 'index.json'}; re-run prepare"

    truncated = tmp_path / "truncated"
    shutil.copytree(data_prepared, truncated)
    shard = truncated / "val" / "shard.00000.mds.zstd"
    shard.write_bytes(shard.read_bytes()[:-7])
    assert error(truncated).startswith(f"shard file {shard} is corrupt: {shard.stat().st_size} bytes, ")

    unfinished = tmp_path / "unfinished"
    shutil.copytree(data_prepared, unfinished)
    (unfinished / "titans_data.json").unlink()
    assert error(unfinished).startswith(f"{unfinished} has no titans_data.json: it is not a prepared data directory")

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(data_docs), encoding="utf-8")
    other_vocab = train_tokenizer(str(corpus), 420, tmp_path / "v420.model", progress=False, threads=1)
    assert error(data_prepared, other_vocab.path) == (
        f"tokenizer {other_vocab.path} has vocab 420, but the shards in {data_prepared} were prepared with vocab 400; "
        f"use the tokenizer the shards were made with ({data_tokenizer_path}) or re-run prepare with this one"
    )
    other_model = train_tokenizer(str(corpus), 400, tmp_path / "v400.model", progress=False, threads=1)
    message = error(data_prepared, other_model.path)
    assert message.startswith(f"tokenizer {other_model.path} (sha256 {other_model.sha256[:12]}) is not the one the shards in {data_prepared} were prepared with")
    assert check_shards(data_prepared, data_tokenizer_path)["tokenizer"]["sha256"] == Tokenizer(data_tokenizer_path).sha256
    with pytest.raises(DataError, match=r"data.seq_len=16 but the shards in .* hold sequences of 32"):
        build_train_loader(DataConfig(data_dir=str(data_prepared), tokenizer=data_tokenizer_path, seq_len=16), micro_batch=1, dp_rank=0, dp_size=1)


# ------------------------------------------------------------------------------------------ crash safety
def test_encoding_error_names_its_own_line(tmp_path, data_tokenizer_path):
    """The line of an invalid UTF-8 byte, far past the first read buffer, in plain and gzipped JSON lines."""
    lines = [json.dumps({"text": f"document {i} " + "word " * 20}).encode() for i in range(600)]  # ~80 KB
    lines[456] = b'{"text": "caf\xe9"}'
    for name, write in (("bad.jsonl", Path.write_bytes), ("bad.jsonl.gz", lambda p, b: p.write_bytes(gzip.compress(b)))):
        write(tmp_path / name, b"\n".join(lines) + b"\n")
        assert data_prepare_error(str(tmp_path / name), data_tokenizer_path, tmp_path / "out") == (
            f"corpus file {tmp_path / name} line 457 is not UTF-8 text (byte 14 of the line: b'\\xe9')")


def test_an_oversized_document_is_cut_into_bounded_documents(tmp_path, data_tokenizer_path, monkeypatch):
    """A one-line document longer than MAX_DOCUMENT_CHARS becomes documents of at most that length, cut at
    whitespace, each routed to train or validation on its own (a single 50 MB line no longer costs gigabytes
    and then fails with an empty validation split)."""
    from titans_scale.data import prepare as prepare_module
    from titans_scale.data.prepare import document_parts

    text = " ".join(data_make_documents(400, seed=3)).replace("\n", " ")
    parts = list(document_parts(text, 4096))
    assert "".join(parts) == text and all(len(p) <= 4096 for p in parts) and len(parts) > 10
    assert all(p[0].isspace() for p in parts[1:])  # cut before whitespace, never inside a word
    assert list(document_parts("x" * 10_000, 4096)) == ["x" * 4096, "x" * 4096, "x" * 1808]  # no whitespace: hard cut
    monkeypatch.setattr(prepare_module, "MAX_DOCUMENT_CHARS", 4096)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    meta = prepare(str(tmp_path / "one.jsonl"), data_tokenizer_path, SEQ, tmp_path / "out", val_fraction=0.2, progress=False)
    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(parts) and splits["val"]["sequences"] > 0


def test_a_killed_prepare_leaves_nothing_read_as_complete_and_the_rerun_cleans_up(tmp_path, data_tokenizer_path):
    """kill -9 in the middle of prepare: the output name does not exist (a loader refuses it in one line), only a
    hidden temporary folder does; the next prepare removes that folder and writes the same shards as a prepare
    that was never interrupted."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in data_make_documents(1500, seed=4)))
    out = tmp_path / "shards"
    script = (f"from titans_scale.data.prepare import prepare\n"
              f"prepare({str(corpus)!r}, {data_tokenizer_path!r}, {SEQ}, {str(out)!r}, shard_size=1 << 14, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        while not list(tmp_path.glob(".shards.tmp-*/train/shard.*")) and proc.poll() is None:  # mid-write
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    leftovers = list(tmp_path.glob(".shards.tmp-*"))
    assert proc.returncode == -9 and not out.exists() and len(leftovers) == 1, (proc.returncode, leftovers)
    with pytest.raises(DataError, match=f"^{out} has no titans_data.json: it is not a prepared data directory"):
        check_shards(out, data_tokenizer_path)
    prepare(str(corpus), data_tokenizer_path, SEQ, out, shard_size=1 << 14, progress=False)
    assert not list(tmp_path.glob(".shards.*")) and check_shards(out, data_tokenizer_path)
    clean = tmp_path / "clean"
    prepare(str(corpus), data_tokenizer_path, SEQ, clean, shard_size=1 << 14, progress=False)
    for split in ("train", "val"):
        hashes = [[s["raw_data"]["hashes"] for s in json.loads((d / split / "index.json").read_text())["shards"]]
                  for d in (out, clean)]
        assert hashes[0] == hashes[1]
