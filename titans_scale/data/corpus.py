"""Corpus readers: FineWeb-style parquet, JSON lines and plain text, from local paths, directories or globs.

Every reader yields `Document`s in a fixed order (files sorted by path, rows in file order), so that
everything derived from a corpus (tokenizer, shards, the train/validation split) is reproducible.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import DataError

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text",
           ".fa": "fasta", ".fasta": "fasta", ".fna": "fasta", ".ffn": "fasta"}
SUPPORTED = (".parquet, .jsonl/.json/.ndjson (one JSON object with a 'text' field per line), .txt (one document per file), "
             ".fa/.fasta/.fna (DNA, pieces of each record); jsonl, txt and FASTA may end in .gz")


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its text, its id in the corpus (FineWeb's `id`, else file:row)."""

    text: str
    id: str
    source: str


def corpus_format(path: Path) -> str:
    """'parquet', 'jsonl' or 'text' from the file name; DataError for anything else."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            suffixes = []  # parquet compresses inside the file; .parquet.gz is not a thing
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(f"corpus file {path}: unsupported file type (supported: {SUPPORTED})")
    return fmt


def resolve_corpus(patterns: str | Sequence[str]) -> list[Path]:
    """Files named by globs, paths or directories (searched recursively), sorted and de-duplicated."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [str(patterns)]
    files: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            found = [p for p in Path(pattern).rglob("*") if p.is_file() and _is_supported(p)]
            if not found:
                raise DataError(f"corpus directory {pattern} holds no {', '.join(FORMATS)} files")
        else:
            found = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not found:
                raise DataError(f"no corpus files match {pattern!r} (give a file, a directory or a glob such as 'sample/10BT/*.parquet')")
        files.update(found)
    paths = sorted(files)
    for path in paths:
        corpus_format(path)
    return paths


def check_corpus(paths: Iterable[Path]) -> None:
    """Fail fast, before any heavy work: every file readable, not empty, parquet with a `text` column."""
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError as err:
            raise DataError(f"corpus file {path}: cannot read it ({err.strerror})") from None
        if size == 0:
            raise DataError(f"corpus file {path} is empty (0 bytes); remove it or fix the download")
        if not os.access(path, os.R_OK):
            raise DataError(f"corpus file {path}: cannot read it (permission denied)")
        if corpus_format(path) == "parquet":
            _parquet_file(path)


def iter_documents(paths: Iterable[Path]) -> Iterator[Document]:
    """All non-empty documents of the given files, in order. A file with no document is an error."""
    readers = {"parquet": _read_parquet, "jsonl": _read_jsonl, "text": _read_text, "fasta": _read_fasta}
    for path in paths:
        count = 0
        for doc in readers[corpus_format(path)](path):
            if doc.text:
                count += 1
                yield doc
        if count == 0:
            raise DataError(f"corpus file {path} holds no documents (no non-empty 'text')")


def _is_supported(path: Path) -> bool:
    try:
        corpus_format(path)
        return True
    except DataError:
        return False


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"corpus file {path} is not a readable parquet file ({_first_line(err)})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(
            f"corpus file {path} has no 'text' column (columns: {', '.join(schema.names) or 'none'}); "
            "FineWeb-style parquet needs the document text in 'text'"
        )
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise DataError(f"corpus file {path}: column 'text' has type {schema.field('text').type}, expected string")
    return pf


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow as pa

    pf = _parquet_file(path)
    columns = ["text"] + (["id"] if "id" in pf.schema_arrow.names else [])
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                yield Document(text or "", str(doc_id) if doc_id is not None else f"{path}:{row}", str(path))
                row += 1
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"corpus file {path} is not a readable parquet file ({_first_line(err)})") from None


def _open_bytes(path: Path) -> io.BufferedIOBase:
    try:
        return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
    except OSError as err:
        raise DataError(f"corpus file {path}: cannot read it ({err.strerror})") from None


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    """UTF-8 text of one line (or file); a DataError naming the line and the byte where it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno += raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"corpus file {path} line {lineno} is not UTF-8 text (byte {column} of the line: "
                        f"{raw[err.start:err.start + 1]!r})") from None


def _read_jsonl(path: Path) -> Iterator[Document]:
    """Lines are split on bytes and decoded one by one, so an encoding error names its own line."""
    with _open_bytes(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, lineno)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"corpus file {path} line {lineno} is not valid JSON ({err.msg})") from None
                if not isinstance(obj, dict) or "text" not in obj:
                    raise DataError(f"corpus file {path} line {lineno} has no 'text' field")
                text = obj["text"]
                if not isinstance(text, str):
                    raise DataError(f"corpus file {path} line {lineno}: 'text' is {type(text).__name__}, expected a string")
                doc_id = obj.get("id")
                yield Document(text, str(doc_id) if doc_id is not None else f"{path}:{lineno}", str(path))
        except (OSError, EOFError) as err:
            raise DataError(f"corpus file {path}: cannot read it ({_first_line(err)})") from None


def _read_text(path: Path) -> Iterator[Document]:
    with _open_bytes(path) as f:
        try:
            raw = f.read()
        except (OSError, EOFError) as err:
            raise DataError(f"corpus file {path}: cannot read it ({_first_line(err)})") from None
    yield Document(_decode(raw, path, 1), str(path), str(path))


def _read_fasta(path: Path) -> Iterator[Document]:
    """A FASTA file's records in pieces of ``dna.PIECE`` bases, upper case (data/dna.py)."""
    from .dna import read_fasta

    for piece_id, bases in read_fasta(path):
        yield Document(bases, piece_id, str(path))


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
