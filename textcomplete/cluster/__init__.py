"""Serving one model from several engine replicas on Ray Serve, routed by shared prompt prefix.

Importable without Ray: `require_ray` says how to install it; the Ray-using modules import it themselves.
"""

from __future__ import annotations

INSTALL_HINT = "pip install textcomplete[ray]"


def require_ray() -> None:
    """Raise ValueError (the CLI prints it and exits 2) naming the extra to install when Ray Serve is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--replicas, --ray-address, --min-replicas and --max-replicas run the engine on Ray "
                         f"Serve, which is not installed ({exc}). Install it with: {INSTALL_HINT}") from None
