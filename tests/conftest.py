"""Shared test helpers. Each area prefixes its helpers with its name (data_ for titans_scale.data)."""

from __future__ import annotations

import random

import pytest

# ----------------------------------------------------------------------------------------------- data
DATA_WORDS = (
    "the memory of a model learns at test time while attention reads a short window and the neural "
    "memory writes what surprises it with momentum and forgetting over long contexts of tokens in chunks "
    "researchers trained networks on web text encyclopedia articles books code and mathematics in 2024"
).split()
DATA_ODDITIES = [
    "Emoji 😀🚀 and flags 🇯🇵 survive.",
    "日本語のテキストと中文文本，한국어도.",
    "Control\x00chars\x01\x7f and a bell\x07.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "digits 3.14159 and 1,000,000 and 0x1F",
    "math ∑ᵢ αᵢ·xᵢ ≤ ∞ and accents café naïve Ångström",
]


def data_make_documents(count: int, seed: int = 0, words: tuple[int, int] = (20, 120)) -> list[str]:
    """Reproducible documents of random prose, with odd characters (emoji, CJK, control) mixed in."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            n = rng.randint(max(2, words[0] // 4), max(3, words[1] // 4))
            sentence = " ".join(rng.choice(DATA_WORDS) for _ in range(n))
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", ";"]))
        if i % 3 == 0:
            sentences.insert(rng.randint(0, len(sentences)), DATA_ODDITIES[i % len(DATA_ODDITIES)])
        sep = rng.choice([" ", "\n", "\n\n"])
        docs.append(f"Document {i}: " + sep.join(sentences))
    return docs


@pytest.fixture(scope="session")
def data_documents() -> list[str]:
    return data_make_documents(240)


@pytest.fixture(scope="session")
def data_tokenizer_path(tmp_path_factory, data_documents) -> str:
    """A tiny LLaMA-style tokenizer (vocab 400) trained on data_documents, shared by the data tests."""
    from titans_scale.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data_tokenizer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(data_documents + DATA_ODDITIES), encoding="utf-8", newline="")
    out = root / "tiny.model"
    train_tokenizer(str(corpus), 400, out, progress=False, threads=1)
    return str(out)
