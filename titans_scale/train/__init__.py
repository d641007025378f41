"""Training: the DeepSpeed engine (``engine``), checkpoints and the model file (``checkpoint``), the learning
rate schedule (``schedule``), progress and metrics (``metrics``), process groups (``distributed``).

``train(cfg)`` runs the main job on every rank; ``load_model(path)`` reads a finished run's ``model.pt``.
"""


def __getattr__(name):  # imported on use: DeepSpeed and megatron take seconds to import
    if name == "train":
        from .engine import train

        return train
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    raise AttributeError(name)


__all__ = ["load_model", "train"]
