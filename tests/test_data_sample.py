"""The bundled sample corpus, for real: the gensim wheel fetched from PyPI, its Wikipedia dump cleaned into
FineWeb-style parquet, then ensure_default_data (tokenizer + shards) and a lossless tokenizer on it."""

from __future__ import annotations

import re

import pyarrow.parquet as pq

from titans_scale.data import DataConfig, Tokenizer, build_sample_corpus, build_train_loader, ensure_default_data, read_metadata
from titans_scale.data.sample import clean_wikitext

FINEWEB_COLUMNS = ["text", "id", "dump", "url", "date", "language", "language_score", "token_count"]


def test_clean_wikitext_keeps_prose_only():
    wikitext = """{{Infobox thing|name=X|image=[[File:X.png|thumb|a [[nested]] caption]]}}
'''Albedo''' ({{IPA|æ}}) is the [[diffuse reflection|diffuse reflectivity]] of a [[surface]].<ref name="a">{{cite web|url=http://x}}</ref>
[[File:Ceres.png|thumb|200px|left|Mean [[albedo]]]]
It was named in [http://example.org 1760] by Lambert.<ref name="a"/> It is 15&nbsp;°C.<!-- hidden -->

==Terrestrial albedo==
{| class="wikitable"
|-
| Fresh asphalt || 0.04
|}
* Snow reflects most light.
==Empty section==
==See also==
* [[Reflectance]]
[[Category:Physics]]
[[de:Albedo]]"""
    assert clean_wikitext(wikitext) == (
        "Albedo is the diffuse reflectivity of a surface.\n\n"
        "It was named in 1760 by Lambert. It is 15 °C.\n\n"
        "Terrestrial albedo\n\n"
        "Snow reflects most light."
    )


def test_sample_corpus_from_pypi_and_default_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TITANS_SAMPLE_WHEEL", raising=False)
    path = build_sample_corpus(progress=False)
    assert path == tmp_path / "sample" / "sample.parquet"
    table = pq.read_table(path)
    assert table.column_names == FINEWEB_COLUMNS and table.num_rows >= 100
    texts = table.column("text").to_pylist()
    assert sum(map(len, texts)) > 2_500_000  # real prose, a few MB
    assert not any(re.search(r"\{\{|\}\}|\[\[|\]\]|<ref|\{\||'''", t) for t in texts)
    assert table.column("url")[0].as_py().startswith("https://en.wikipedia.org/wiki/")
    mtime = path.stat().st_mtime_ns
    assert build_sample_corpus(progress=False) == path and path.stat().st_mtime_ns == mtime  # cached

    cfg = DataConfig(seq_len=256, num_workers=0, vocab_size=4096)
    data_dir = ensure_default_data(cfg, progress=False)
    assert data_dir == tmp_path / "sample" / "shards-v4096-len256"
    meta = read_metadata(data_dir)
    assert meta["splits"]["train"]["sequences"] > 1000 and meta["splits"]["val"]["sequences"] > 10
    assert ensure_default_data(cfg, progress=False) == data_dir  # second call: nothing to do

    tok = Tokenizer(tmp_path / "sample" / "tokenizer-v4096.model")
    assert tok.vocab_size == 4096 and meta["tokenizer"]["sha256"] == tok.sha256
    ids = tok.encode_batch(texts)
    assert [tok.decode(i) for i in ids] == texts  # lossless on the whole sample
    batch = next(iter(build_train_loader(cfg, micro_batch=4, dp_rank=0, dp_size=1)))
    assert batch.shape == (4, 256) and int(batch.max()) < 4096
