"""Throughput of prepare (tokenize + pack + write zstd MDS shards) on the sample corpus, 1 vs 2 workers.

    python benchmarks/bench_prepare.py [--copies 4] [--repeats 2] [--seq-len 512] [--vocab-size 8000]

Builds the sample corpus and its tokenizer first if needed ($TITANS_DATA_DIR or ./data), and runs on
--copies copies of its documents (so that the fixed start-up of the worker processes, about 0.5 s, does
not dominate). Times whole prepare() calls (worker start-up included, library imports excluded), best of
--repeats runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from titans_scale.data import Tokenizer, build_sample_corpus, train_tokenizer  # noqa: E402
from titans_scale.data._streaming import import_streaming  # noqa: E402
from titans_scale.data.config import sample_dir  # noqa: E402
from titans_scale.data.prepare import prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()

    corpus = build_sample_corpus()
    tok_path = sample_dir() / f"tokenizer-v{args.vocab_size}.model"
    tok = Tokenizer(tok_path) if tok_path.exists() else train_tokenizer(str(corpus), args.vocab_size, tok_path)
    import_streaming()  # imported once up front, as in a long prepare run

    load = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        table = pq.read_table(corpus)
        copies = Path(tmp) / "copies.parquet"
        pq.write_table(pa.concat_tables([table] * args.copies), copies)
        for workers in (1, 2):
            best, best_cpu = float("inf"), float("inf")
            for r in range(args.repeats):
                out = Path(tmp) / f"w{workers}-{r}"
                start, cpu = time.perf_counter(), cpu_seconds()
                meta = prepare(str(copies), tok, args.seq_len, out, workers=workers, val_fraction=0.05, progress=False)
                best = min(best, time.perf_counter() - start)
                best_cpu = min(best_cpu, cpu_seconds() - cpu)
                shutil.rmtree(out)
            tokens = sum(s["tokens"] + s["dropped_tokens"] for s in meta["splits"].values())
            results[workers] = (tokens, best, best_cpu)

    print(
        f"bench_prepare: sample corpus x{args.copies}: {meta['source']['documents']} docs, {meta['source']['chars'] / 1e6:.2f}M chars, "
        f"tokenizer vocab {tok.vocab_size}, seq_len {args.seq_len}, {os.cpu_count()} cores, best of {args.repeats}"
    )
    print(f"load average before: {load:.1f} (over {os.cpu_count()} cores: higher means the timings are shared)")
    for workers, (tokens, seconds, cpu) in results.items():
        print(f"workers={workers}: {tokens / 1e3:.1f}k tokens in {seconds:.2f} s = {tokens / seconds / 1e3:.1f}k tok/s ({cpu:.2f} CPU s, all processes)")
    (t1, s1, c1), (t2, s2, c2) = results[1], results[2]
    print(f"ratio workers=2 / workers=1: {(t2 / s2) / (t1 / s1):.2f}x tokens/s, {c2 / c1:.2f}x CPU time")


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the tokenizer workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
