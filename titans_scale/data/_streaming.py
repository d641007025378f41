"""Import mosaicml-streaming without its vision module, whose torchvision import fails beside CPU torch."""

from __future__ import annotations

import sys
import types


def import_streaming():
    """The `streaming` package. We use only its MDS format and StreamingDataset; streaming's
    `__init__` imports `streaming.vision`, which imports torchvision, whose CUDA build fails to load
    next to a CPU torch ("operator torchvision::nms does not exist"), so empty modules stand in."""
    if "streaming" not in sys.modules:
        # streaming.text and .multimodal pull transformers (and through it scikit-learn): seconds per
        # import that the MDS path never needs.
        for name in ("streaming.vision", "streaming.text", "streaming.multimodal"):
            sys.modules.setdefault(name, types.ModuleType(name))
    import streaming

    return streaming
