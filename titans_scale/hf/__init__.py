"""The Hugging Face layout: ``export`` / ``from_pretrained`` (``layout``), and the transformers wrappers that
travel with every export (``configuration_titans``, ``modeling_titans``, ``tokenization_titans``)."""

from __future__ import annotations

from titans_scale._lazy import lazy_getattr

_EXPORTS = {
    "export": "layout",
    "from_pretrained": "layout",
    "is_export": "layout",
    "TitansConfig": "configuration_titans",
    "TitansForCausalLM": "modeling_titans",
    "TitansTokenizer": "tokenization_titans",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
