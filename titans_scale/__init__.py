"""titans_scale: an open pretraining stack for Titans (neural long-term memory) language models."""

__version__ = "0.1.0"


def version_text() -> str:
    """What every command's ``--version`` prints: the version and which copy of the package runs."""
    import os

    return f"titans_scale {__version__} ({os.path.dirname(os.path.abspath(__file__))})"


def __getattr__(name: str):
    """``titans_scale.from_pretrained(EXPORT)``: the TitansLM of a Hugging Face export (titans_scale.hf.layout),
    imported on first use so that ``import titans_scale`` stays light."""
    if name == "from_pretrained":
        from titans_scale.hf.layout import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'titans_scale' has no attribute {name!r}")
