"""The cluster's options and the `serve` flags they come from (importable without Ray).

`--replicas`, `--ray-address`, `--min-replicas`, `--max-replicas` and `--router`; see docs/scaling.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from textcomplete.api.limits import ServerLimits


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = 1                    # replicas at start
    min_replicas: int | None = None      # with max_replicas: autoscale between the two
    max_replicas: int | None = None
    ray_address: str | None = None       # None: start a local Ray instance
    router: str = "prefix"               # "prefix" (ours) or "default" (Serve's power of two choices)
    max_queued_requests: int = 256       # per replica, beyond its running batch
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        lo, hi = self.bounds
        if lo < 1 or not lo <= self.replicas <= hi:
            raise ValueError(f"replicas must satisfy 1 <= --min-replicas ({lo}) <= --replicas ({self.replicas}) "
                             f"<= --max-replicas ({hi})")
        if self.router not in ("prefix", "default"):
            raise ValueError(f"--router must be prefix or default, not {self.router!r}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def bounds(self) -> tuple[int, int]:
        """The fewest and most replicas (both `replicas` without autoscaling)."""
        if not self.autoscaling:
            return self.replicas, self.replicas
        return self.min_replicas or 1, self.max_replicas or max(self.replicas, self.min_replicas or 1)


def add_cluster_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("replicas (Ray Serve; needs pip install textcomplete[ray])")
    group.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="Run N engine replicas on Ray Serve behind this one endpoint, requests routed to the "
                            "replica that holds their prompt's prefix in its cache (default: one engine in this "
                            "process, no Ray).")
    group.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="Join the Ray cluster at ADDRESS (e.g. auto, or HOST:6379) instead of starting a local "
                            "Ray instance.")
    group.add_argument("--min-replicas", type=int, default=None, metavar="N",
                       help="Autoscale: the fewest replicas (default with --max-replicas: 1).")
    group.add_argument("--max-replicas", type=int, default=None, metavar="N",
                       help="Autoscale: the most replicas; Serve adds one when replicas average more ongoing "
                            "requests than --max-num-seqs (queues are forming) and removes one when idle.")
    group.add_argument("--router", choices=["prefix", "default"], default="prefix",
                       help="prefix: to the replica holding the longest cached prefix, the less loaded of two "
                            "random ones when its queue is much longer; default: Ray Serve's own power of two "
                            "choices, for comparison (default: prefix).")



def cluster_options(args: argparse.Namespace, limits: ServerLimits) -> ClusterOptions | None:
    """`serve`'s replica flags as the cluster's options; None when none was given (one engine, no Ray)."""
    if all(getattr(args, n) is None for n in ("replicas", "ray_address", "min_replicas", "max_replicas")):
        return None
    return ClusterOptions(replicas=args.replicas or args.min_replicas or 1, min_replicas=args.min_replicas,
                          max_replicas=args.max_replicas, ray_address=args.ray_address, router=args.router,
                          max_queued_requests=limits.max_queued_requests, shutdown_timeout=args.shutdown_timeout)
