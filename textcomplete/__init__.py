"""textcomplete: the OpenAI text Completions API, served by its own PyTorch engine.

The public entry points are the engine (`textcomplete.engine`) and the command line (`textcomplete.cli`).
"""

__version__ = "0.1.0"

_CLIENT_NAMES = {"Client", "AsyncClient", "APIError", "BadRequestError", "AuthenticationError", "NotFoundError",
                 "RateLimitError", "InternalServerError", "Completion"}


def __getattr__(name: str):
    """`textcomplete.Client` and friends, imported on first use (they pull in torch)."""
    if name in _CLIENT_NAMES:
        from textcomplete import client
        return getattr(client, name)
    raise AttributeError(f"module 'textcomplete' has no attribute {name!r}")
