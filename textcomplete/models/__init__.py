"""Model definitions and loading: one file per architecture behind a registry, loaders per weight format.

`load_model` turns a model name (directory, .gguf file, hub id or the default) into a ready model.
"""

from __future__ import annotations

__all__ = ["LoadedModel", "load_model"]


def __getattr__(name: str) -> object:
    # Imported on first use, so that reading the registry (the CLI's --help does) does not load torch.
    if name in __all__:
        from textcomplete.models import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
