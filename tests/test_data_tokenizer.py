"""Tokenizer: LLaMA-style BPE training, lossless round trips (byte fallback), hashing, clear errors."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys

import pytest
from conftest import DATA_ODDITIES, data_make_documents

from titans_scale.data import DataError, Tokenizer
from titans_scale.data.tokenizer import train_tokenizer


def test_round_trip_is_lossless(data_tokenizer_path, data_documents):
    tok = Tokenizer(data_tokenizer_path)
    unseen = data_make_documents(20, seed=99) + [
        "never seen: Ελληνικά, русский, עברית, ไทย, 🦜🧬",
        "\x1b[31mANSI\x1b[0m \ufeffBOM \u200bzero-width \U0010ffff",
        " ",
        "\n",
        "",
    ]
    for text in data_documents + DATA_ODDITIES + unseen:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 < i < tok.vocab_size for i in ids)  # byte fallback: never <unk> (id 0)
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_llama_style_layout(data_tokenizer_path):
    tok = Tokenizer(data_tokenizer_path)
    assert (tok.vocab_size, tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (400, 0, 1, 2, -1)
    assert tok.sp.id_to_piece(3) == "<0x00>" and tok.sp.id_to_piece(258) == "<0xFF>"  # 256 byte pieces
    digits = tok.encode("2024")
    assert [tok.decode([i]).strip() for i in digits[-4:]] == ["2", "0", "2", "4"]  # digits split one by one


def test_hash_pickle_and_determinism(tmp_path, data_tokenizer_path, data_documents):
    tok = Tokenizer(data_tokenizer_path)
    with open(data_tokenizer_path, "rb") as f:
        assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256 and clone.encode("memory 42") == tok.encode("memory 42")
    # same corpus, vocab and seed give the same file; a different corpus gives another hash
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(data_documents + DATA_ODDITIES), encoding="utf-8", newline="")
    again = train_tokenizer(str(corpus), 400, tmp_path / "again.model", progress=False, threads=1)
    assert again.sha256 == tok.sha256
    corpus.write_text("\n".join(data_documents[:100]), encoding="utf-8")
    other = train_tokenizer(str(corpus), 400, tmp_path / "other.model", progress=False, threads=1)
    assert other.sha256 != tok.sha256


def test_errors_name_the_file(tmp_path, data_tokenizer_path):
    with pytest.raises(DataError, match=r"tokenizer .*missing\.model does not exist; train one with"):
        Tokenizer(tmp_path / "missing.model")
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(DataError, match=r"tokenizer .*bogus\.model is not a sentencepiece model file"):
        Tokenizer(bogus)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text")
    with pytest.raises(DataError, match=r"--vocab-size 100 is too small"):
        train_tokenizer(str(corpus), 100, tmp_path / "t.model", progress=False)
    with pytest.raises(DataError, match=r"vocab of 260 on .*c\.txt: Vocabulary size is smaller than required_chars"):
        corpus.write_text("".join(map(chr, range(0x4E00, 0x4F00))))  # 256 distinct CJK characters
        train_tokenizer(str(corpus), 260, tmp_path / "t.model", progress=False)
    with pytest.raises(DataError, match=r"already exists; pass --overwrite"):
        train_tokenizer(str(corpus), 300, data_tokenizer_path, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 has no 'text' field"):  # raised inside sentencepiece's reader
        train_tokenizer(str(bad), 300, tmp_path / "t.model", progress=False)
    assert not (tmp_path / "t.model").exists()


def test_cli_trains_with_progress_and_fails_in_one_line(tmp_path, data_documents):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"text": {__import__("json").dumps(d)}}}\n' for d in data_documents[:50]))
    out = tmp_path / "cli.model"
    cmd = [sys.executable, "-m", "titans_scale.data.tokenizer", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(out)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "tokenizer: read 50 docs" in ok.stderr and f"wrote {out} (vocab 400, sha256 " in ok.stderr
    assert Tokenizer(out).vocab_size == 400
    fail = subprocess.run(cmd[:4] + [str(tmp_path / "nothing*.parquet")] + cmd[5:-1] + [str(tmp_path / "x.model")], capture_output=True, text=True, timeout=120)
    assert fail.returncode == 2
    assert fail.stderr.strip().count("\n") == 0 and fail.stderr.startswith("error: no corpus files match")


def test_batch_encoding_cut_at_newlines_is_exact(tmp_path, monkeypatch, data_tokenizer_path, data_documents):
    import io

    import sentencepiece as spm

    from titans_scale.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "CUT_CHARS", 4)  # cut (almost) every line apart
    texts = data_documents[:60] + DATA_ODDITIES + ["\n", "\nlead", "trail\n", "\n\n\n", "a\r\n\r\nb", " \n \n ", ""]
    tok = Tokenizer(data_tokenizer_path)
    assert tok._newline_prefix == [tok.sp.piece_to_id("▁")]  # LLaMA-style: the fast path is on
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    # a model with a newline inside its pieces: no cutting, same answers
    model = io.BytesIO()
    corpus = "\n".join(data_documents[:80]).split("\n")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, user_defined_symbols=["\n"], minloglevel=2, **{k: v for k, v in tokenizer_module.LLAMA_STYLE.items()})
    (tmp_path / "nl.model").write_bytes(model.getvalue())
    other = Tokenizer(tmp_path / "nl.model")
    assert other._newline_prefix is None and other.encode_batch(texts) == [other.encode(t) for t in texts]
