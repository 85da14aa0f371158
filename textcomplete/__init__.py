"""textcomplete: the OpenAI text Completions API, served by its own PyTorch engine.

The public entry points are the engine (`textcomplete.engine`) and the command line (`textcomplete.cli`).
"""

__version__ = "0.1.0"
