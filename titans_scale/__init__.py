"""titans_scale: an open pretraining stack for Titans (neural long-term memory) language models."""

__version__ = "0.1.0"
