"""Model definitions and loading: one file per architecture behind a registry, loaders per weight format.

`load_model` turns a model name (directory, .gguf file, hub id or the default) into a ready model.
"""

from textcomplete.models.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
