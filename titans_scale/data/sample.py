"""The bundled offline sample corpus: 100-odd real English Wikipedia articles, as FineWeb-style parquet.

Command: python -m titans_scale.data.sample [--out DIR]   (default DIR: $TITANS_DATA_DIR/sample or ./data/sample)

Source: the wheel of gensim 4.4.0 on PyPI carries a shortened dump of the first English Wikipedia
articles (gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2,
1.7 MB bz2, about 6 MB of wikitext; text CC BY-SA, Wikipedia contributors). We fetch that one wheel
with `pip download --no-deps` (no install: gensim would pull scipy and more into the environment) and
read the file out of the wheel's zip; an installed gensim, or a wheel named by $TITANS_SAMPLE_WHEEL,
is used instead when present. The wikitext is cleaned to prose (templates, references, tables, files
and link markup dropped; trailing reference sections cut) and written as DIR/sample.parquet with the
FineWeb columns. The result is cached: a second call returns at once.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence
from xml.etree import ElementTree

from titans_scale import version_text

from .config import sample_dir
from .errors import DataError, run_cli
from .progress import Progress, human
from .files import write_atomic

GENSIM_VERSION = "4.4.0"
# One fixed wheel (any platform can download it), so the bytes we read are the same everywhere.
WHEEL_TAGS = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
SAMPLE_NAME = "sample.parquet"
SAMPLE_VERSION = "2"  # bump when the cleaning changes: cached samples of another version are rebuilt
DUMP = "enwiki-latest-pages-articles1 (shortened; gensim 4.4.0 test data)"
MIN_CHARS = 500  # articles shorter than this after cleaning (stubs, lists) are left out
END_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography", "sources", "footnotes", "citations", "notes and references"}


def build_sample_corpus(out: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Build (once) and return DIR/sample.parquet, the sample corpus in the FineWeb schema."""
    import pyarrow.parquet as pq

    out_dir = Path(out) if out is not None else sample_dir()
    target = out_dir / SAMPLE_NAME
    if target.exists():
        try:
            meta = pq.read_schema(target).metadata or {}
            if meta.get(b"titans_sample_version") == SAMPLE_VERSION.encode():
                return target
        except Exception:
            pass  # unreadable: rebuild it
    bar = Progress("sample", enabled=progress)
    raw = _source_bz2(out_dir, bar)
    bar.update("cleaning wikitext", force=True)
    rows = list(_articles(bz2.decompress(raw)))
    table = _fineweb_table(rows)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(target, buf.getvalue())
    chars = sum(len(r["text"]) for r in rows)
    bar.done(f"wrote {target}: {len(rows)} Wikipedia articles, {human(chars)} chars of prose ({bar.elapsed:.1f}s; text CC BY-SA)")
    return target


def _source_bz2(out_dir: Path, bar: Progress) -> bytes:
    """The bz2 dump, from the cache, an installed gensim, $TITANS_SAMPLE_WHEEL, or the PyPI wheel."""
    cached = out_dir / "downloads" / Path(MEMBER).name
    if cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == MEMBER_SHA256:
        return cached.read_bytes()
    data = _from_installed_gensim()
    if data is None:
        wheel = os.environ.get("TITANS_SAMPLE_WHEEL")
        data = _from_wheel(Path(wheel)) if wheel else _download(out_dir, bar)
    write_atomic(cached, data)
    return data


def _from_installed_gensim() -> bytes | None:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / MEMBER
    if path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == MEMBER_SHA256:
            return data
    return None


def _from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"cannot read {MEMBER} from wheel {wheel} ({type(err).__name__}); is it gensim {GENSIM_VERSION}?") from None
    if hashlib.sha256(data).hexdigest() != MEMBER_SHA256:
        raise DataError(f"{MEMBER} in {wheel} is not the expected file (sha256 differs); use the gensim {GENSIM_VERSION} wheel")
    return data


def _download(out_dir: Path, bar: Progress) -> bytes:
    bar.update(f"downloading the gensim {GENSIM_VERSION} wheel from PyPI (28 MB, not installed) for its Wikipedia test data", force=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=out_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *WHEEL_TAGS, "--dest", tmp, "--quiet", f"gensim=={GENSIM_VERSION}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            proc = None
            reason = str(err)
        if proc is not None:
            reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        wheels = sorted(Path(tmp).glob("gensim-*.whl"))
        if proc is None or proc.returncode != 0 or not wheels:
            raise DataError(
                f"could not download the gensim {GENSIM_VERSION} wheel with pip to build the sample corpus ({reason}); "
                "check network access to PyPI, set TITANS_SAMPLE_WHEEL to a downloaded copy, or use your own --corpus"
            )
        return _from_wheel(wheels[0])


# ------------------------------------------------------------------------------ wikitext -> prose
def _articles(xml: bytes) -> Iterator[dict]:
    """Main-namespace, non-redirect pages of a MediaWiki export, cleaned to prose, in file order."""
    for _, elem in ElementTree.iterparse(io.BytesIO(xml)):
        if _local(elem.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in elem}
        revision = {_local(c.tag): c for c in fields["revision"]} if "revision" in fields else {}
        if fields.get("ns") is not None and fields["ns"].text == "0" and "redirect" not in fields and "text" in revision:
            text = clean_wikitext(revision["text"].text or "")
            if len(text) >= MIN_CHARS:
                title = fields["title"].text or ""
                yield {
                    "text": text,
                    "id": f"<urn:enwiki:{fields['id'].text}>",
                    "url": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_"),
                    "date": revision["timestamp"].text if "timestamp" in revision else None,
                }
        elem.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _replace_balanced(text: str, opener: str, closer: str, repl: Callable[[str], str]) -> str:
    """Replace each outermost opener...closer span (they nest) by repl(inner). A scanner, not one regex:
    the inner text may hold single braces or brackets ("{|}~" in a template, "[above]" in a caption)."""
    out: list[str] = []
    depth = start = last = 0
    open_len = 0
    for m in re.finditer(f"(?P<open>{opener})|(?P<close>{closer})", text, re.M):
        if m.group("open") is not None:
            if depth == 0:
                out.append(text[last : m.start()])
                start, open_len = m.start(), len(m.group())
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                out.append(repl(text[start + open_len : m.start()]))
                last = m.end()
    out.append(text[last:] if depth == 0 else text[last:start] + text[start + open_len :])  # unclosed: drop the opener only
    return "".join(out)


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROP_TAGS = re.compile(r"<(gallery|math|timeline|score|syntaxhighlight|source|imagemap|chem)[^>]*>.*?</\1>", re.S | re.I)
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_DROP_NAMESPACES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "template:", "help:", "portal:", "special:")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")


def _link_text(inner: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; files, categories and interwiki links -> ''."""
    target = inner.split("|", 1)[0].strip().lower()
    if target.startswith(_DROP_NAMESPACES) or _INTERWIKI.match(target):
        return ""
    inner = _replace_balanced(inner, r"\[\[", r"\]\]", _link_text)
    return inner.rsplit("|", 1)[-1] if "|" in inner else inner


def clean_wikitext(text: str) -> str:
    """Wikitext -> plain prose: keep paragraphs, headings and list items as text; drop the rest."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _replace_balanced(text, r"\{\{", r"\}\}", lambda inner: "")  # templates
    text = _replace_balanced(text, r"^[ \t]*\{\|", r"^[ \t]*\|\}", lambda inner: "")  # tables
    text = _replace_balanced(text, r"\[\[", r"\]\]", _link_text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = re.sub(r"'{2,}", "", text)
    text = text.replace("<br>", " ").replace("<br />", " ").replace("<br/>", " ")
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)
    lines: list[tuple[str, bool]] = []  # (line, is_heading)
    for line in text.split("\n"):
        line = line.strip()
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in END_SECTIONS:
                break
            line = heading.group(2).strip()
        elif line[:1] in ("*", "#", ":", ";"):
            line = line.lstrip("*#:; ").strip()
        elif line[:1] in ("|", "!", "{", "}"):
            continue  # remains of malformed tables or templates
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left where a template was
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r" ([,.;:])", r"\1", line)
        if re.search(r"\w", line):
            lines.append((line, bool(heading)))
        elif lines and lines[-1][0]:
            lines.append(("", False))
    # keep a heading only when prose follows it before the next heading
    kept = [
        line
        for i, (line, is_heading) in enumerate(lines)
        if not is_heading or any(text and not head for text, head in _until_heading(lines[i + 1 :]))
    ]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def _until_heading(lines: list[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    for line, is_heading in lines:
        if is_heading:
            return
        yield line, is_heading


def _fineweb_table(rows: list[dict]):
    """The FineWeb columns: text, id, dump, url, date, language, language_score, token_count.
    language_score and token_count are null: FineWeb measures them with models we do not ship."""
    import pyarrow as pa

    schema = pa.schema(
        [
            ("text", pa.string()),
            ("id", pa.string()),
            ("dump", pa.string()),
            ("url", pa.string()),
            ("date", pa.string()),
            ("language", pa.string()),
            ("language_score", pa.float64()),
            ("token_count", pa.int64()),
        ],
        metadata={
            "titans_sample_version": SAMPLE_VERSION,
            "source": f"pypi:gensim=={GENSIM_VERSION}:{MEMBER} sha256={MEMBER_SHA256}",
            "license": "CC BY-SA 3.0 (text of Wikipedia articles, Wikipedia contributors)",
        },
    )
    columns = {name: [r.get(name) for r in rows] for name in ("text", "id", "url", "date")}
    columns.update(dump=[DUMP] * len(rows), language=["en"] * len(rows), language_score=[None] * len(rows), token_count=[None] * len(rows))
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titans_scale.data.sample", description="Build the offline sample corpus (FineWeb-style parquet of Wikipedia articles).")
    parser.add_argument("--out", default=None, help="directory (default: $TITANS_DATA_DIR/sample or ./data/sample)")
    parser.add_argument("--version", action="version", version=version_text())
    args = parser.parse_args(argv)
    print(build_sample_corpus(args.out))


if __name__ == "__main__":
    run_cli(main)
