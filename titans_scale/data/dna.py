"""DNA: the character-level tokenizer, FASTA reading, GenomicsBenchmarks-style class folders, and the
generated data the default runs use (a genome-like FASTA, a long-range classification task).

Tokens: one per base, A C G T N (lower case, soft-masked repeats, reads as upper case), as a sentencepiece
``char`` model, so the whole token path (prepare, shards, loader, perplexity, generation) takes DNA as it
is: unk = 0, bos = 1, eos = 2, then A C G T N = 3 4 5 6 7.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError
from .files import write_atomic

ALPHABET = "ACGTN"
VOCAB_SIZE = 3 + len(ALPHABET)  # unk, bos, eos and the bases
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".seq")
PIECE = 1 << 16  # a FASTA record becomes documents of this many bases (a chromosome is too long for one)
_UNEXPECTED = re.compile(f"[^{ALPHABET}{ALPHABET.lower()}]")


def dna_tokenizer(path: str | Path):
    """The character-level DNA tokenizer at ``path``, written there first if it is not there yet (the file
    is the same on every machine: the shards' tokenizer check holds across them)."""
    from .tokenizer import Tokenizer

    path = Path(path)
    if not path.exists():
        import sentencepiece as spm

        model = io.BytesIO()
        # one line per base, more of the earlier ones: ids follow frequency, so A C G T N get 3 .. 7
        lines = [base * (10 * (len(ALPHABET) - i)) for i, base in enumerate(ALPHABET)]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB_SIZE, model_type="char",
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=1,
        )
        write_atomic(path, model.getvalue())
    tok = Tokenizer(path)
    pieces = [tok.sp.id_to_piece(i) for i in range(3, tok.vocab_size)]
    if tok.vocab_size != VOCAB_SIZE or pieces != list(ALPHABET):
        raise DataError(f"tokenizer {path} is not the DNA tokenizer (pieces {pieces}); remove it to have it rebuilt")
    return tok


def check_bases(text: str, where: str) -> None:
    """A one-line DataError at the first character that is not a base."""
    bad = _UNEXPECTED.search(text)
    if bad:
        raise DataError(f"{where}: unexpected character {bad.group()!r} at column {bad.start() + 1}; DNA files may "
                        f"hold only A, C, G, T and N (lower case reads as upper case): clean the file or map other "
                        f"IUPAC codes to N")


def is_fasta(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in FASTA_SUFFIXES


def _open(path: Path):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="ascii") if path.suffix.lower() == ".gz" \
        else open(path, encoding="ascii")


def read_fasta(path: str | Path, piece: int = PIECE) -> Iterator[tuple[str, str]]:
    """(id, bases) of a FASTA file: each record's sequence, upper case, in pieces of at most ``piece``
    bases (ids ``name:offset``). Unexpected characters and files without bases are one-line DataErrors."""
    path = Path(path)
    name, offset, parts, size, found = path.stem, 0, [], 0, False
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith(";"):
                    continue
                if line.startswith(">"):
                    if parts:
                        yield f"{name}:{offset}", "".join(parts)
                    name, offset, parts, size = (line[1:].split() or [f"record{lineno}"])[0], 0, [], 0
                    continue
                check_bases(line, f"FASTA file {path} line {lineno}")
                parts.append(line.upper())
                size += len(line)
                found = True
                while size >= piece:
                    whole = "".join(parts)
                    yield f"{name}:{offset}", whole[:piece]
                    offset += piece
                    parts, size = [whole[piece:]], len(whole) - piece
    except UnicodeDecodeError:
        raise DataError(f"FASTA file {path} is not plain ASCII text (a binary or compressed file without .gz?)") from None
    except (OSError, EOFError) as err:
        raise DataError(f"FASTA file {path}: cannot read it ({str(err).strip() or type(err).__name__})") from None
    if parts and size:
        yield f"{name}:{offset}", "".join(parts)
    if not found:
        raise DataError(f"FASTA file {path} holds no bases (a FASTA file: '>name' lines, then lines of A C G T N)")


# ----------------------------------------------------------------------------------------------------
# GenomicsBenchmarks layout: <split>/<class>/<one file per sequence>


@dataclass
class LabelledSequences:
    """The sequences of one split with their class ids (classes in sorted folder-name order)."""

    sequences: list[str]
    labels: np.ndarray
    classes: list[str]


def read_class_folders(split_dir: str | Path, classes: list[str] | None = None) -> LabelledSequences:
    """Every sequence under ``split_dir/<class>/``: one per file (its lines joined; a file with '>' headers
    gives one per record). ``classes``: the class names expected (those of training), in label order."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist; a GenomicsBenchmarks-style data set has train/ and test/, "
                        f"each with one folder of sequence files per class")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(found) < 2:
        raise DataError(f"{split_dir} holds {len(found)} class folder(s) ({', '.join(found) or 'none'}); a classification "
                        f"data set needs one folder of sequence files per class, at least two")
    if classes is not None and found != classes:
        raise DataError(f"{split_dir} has the classes {', '.join(found)}, the model was trained on "
                        f"{', '.join(classes)}; use a data set with the same class folders")
    sequences, labels = [], []
    for label, name in enumerate(found):
        count = 0
        for file in sorted(p for p in (split_dir / name).rglob("*") if p.is_file() and not p.name.startswith(".")):
            for sequence in _sequences_of(file):
                sequences.append(sequence)
                labels.append(label)
                count += 1
        if count == 0:
            raise DataError(f"class folder {split_dir / name} holds no sequences (no non-empty files); add its "
                            f"sequences or remove the folder")
    return LabelledSequences(sequences, np.array(labels, dtype=np.int64), found)


def _sequences_of(file: Path) -> Iterator[str]:
    if is_fasta(file) or _starts_with(file, ">"):
        yield from (bases for _, bases in read_fasta(file, piece=1 << 62))
        return
    try:
        text = file.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise DataError(f"sequence file {file} is not plain ASCII text") from None
    except OSError as err:
        raise DataError(f"sequence file {file}: cannot read it ({err.strerror})") from None
    bases = "".join(text.split())
    if bases:
        check_bases(bases, f"sequence file {file}")
        yield bases.upper()


def _starts_with(file: Path, prefix: str) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(len(prefix)) == prefix.encode()
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# Generated data


@dataclass
class GeneratedGenome:
    """A genome-like FASTA with structure a language model can learn: a third-order Markov background with
    a peaked transition table, a few repeat families copied (with 5% point mutations) all over it, and N runs
    at the ends of each record, as in an assembly."""

    records: int = 2
    length: int = 200_000  # bases per record
    seed: int = 0

    def write(self, path: Path) -> Path:
        rng = np.random.default_rng(self.seed)
        table = rng.dirichlet(np.full(4, 0.3), size=64)  # P(next base | previous three)
        cumulative = table.cumsum(1)
        repeats = [rng.integers(0, 4, int(rng.integers(200, 600))) for _ in range(5)]
        lines = []
        for record in range(self.records):
            seq = np.empty(self.length, dtype=np.int64)
            seq[:3] = rng.integers(0, 4, 3)
            draws = rng.random(self.length)
            for i in range(3, self.length):
                context = seq[i - 3] * 16 + seq[i - 2] * 4 + seq[i - 1]
                seq[i] = np.searchsorted(cumulative[context], draws[i])
            for _ in range(self.length // 2000):
                copy = repeats[int(rng.integers(len(repeats)))].copy()
                mutate = rng.random(len(copy)) < 0.05
                copy[mutate] = rng.integers(0, 4, int(mutate.sum()))
                at = int(rng.integers(0, self.length - len(copy)))
                seq[at : at + len(copy)] = copy
            text = np.array(list("ACGT"))[np.minimum(seq, 3)]
            text[:100] = text[-100:] = "N"
            bases = "".join(text)
            lines.append(f">chr{record + 1} generated by titans_scale (seed {self.seed})")
            lines += [bases[i : i + 60] for i in range(0, len(bases), 60)]
        write_atomic(path, ("\n".join(lines) + "\n").encode())
        return path


@dataclass
class MotifTask:
    """A classification task with a long-range dependence. Each sequence is random bases with two motif
    slots: one within the first length / 8 bases, one within the last length / 8 + motif_len. Each slot
    holds one of two motifs, M or another; the class is how many slots hold M: ``none``, ``one`` or
    ``two``. The end alone leaves two classes equally likely, so a model that cannot see the start scores
    at most 50%; one that carries the start motif to the end can score 100%."""

    length: int = 256
    train: int = 2000
    test: int = 500
    seed: int = 0
    motif_len: int = 8

    CLASSES = ("none", "one", "two")

    def motifs(self) -> tuple[np.ndarray, np.ndarray]:
        """M and the other motif."""
        rng = np.random.default_rng([self.seed, 7])
        return rng.integers(0, 4, self.motif_len), rng.integers(0, 4, self.motif_len)

    def sample(self, rng: np.random.Generator) -> tuple[str, str]:
        motifs, m = self.motifs(), self.motif_len
        seq = rng.integers(0, 4, self.length)
        first, last = int(rng.integers(2)), int(rng.integers(2))  # 0: M
        head, tail = self.length // 8, self.length // 8 + m
        start, end = int(rng.integers(0, head - m + 1)), int(rng.integers(self.length - tail, self.length - m + 1))
        seq[start : start + m] = motifs[first]
        seq[end : end + m] = motifs[last]
        return "".join("ACGT"[b] for b in seq), self.CLASSES[(first == 0) + (last == 0)]

    def write(self, root: Path) -> Path:
        """The task in the GenomicsBenchmarks layout under ``root`` (train/ and test/, a folder per class)."""
        for split, count, stream in (("train", self.train, 1), ("test", self.test, 2)):
            rng = np.random.default_rng([self.seed, stream])
            for i in range(count):
                bases, label = self.sample(rng)
                write_atomic(root / split / label / f"{i:06d}.txt", (bases + "\n").encode())
        return root
