"""Start the engine replicas on Ray Serve and hand back the front end's engine; stop them again.

Joins the Ray cluster at `ray_address`, or starts a small local Ray instance (which it alone stops).
The front end stays this process's own ASGI app: Serve runs no HTTP proxy, only the replicas.
"""

from __future__ import annotations

import logging

from textcomplete.cluster import require_ray
from textcomplete.cluster.options import ClusterOptions
from textcomplete.config import EngineConfig

log = logging.getLogger(__name__)
APP_NAME = "textcomplete"
LOCAL_OBJECT_STORE = 200 << 20     # outputs are small: a local instance needs little shared memory
ROUTING_STATS_PERIOD_S = 1.0       # how often replicas report their load to the routers


def deployment_options(config: EngineConfig, options: ClusterOptions) -> dict:
    """The engine deployment's Serve options (pure, for tests)."""
    from ray.serve.config import RequestRouterConfig

    from textcomplete.cluster.router import ROUTERS
    router = ROUTERS[options.router]
    scaling = {"num_replicas": options.replicas}
    if options.autoscaling:
        lo, hi = options.bounds
        # Scale on queue length: a replica runs max_num_seqs requests per step, so more ongoing requests
        # than that on average means requests are waiting.
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": options.replicas,
                                          "target_ongoing_requests": config.max_num_seqs,
                                          "upscale_delay_s": 10, "downscale_delay_s": 120}}
    return {
        "name": "engine",
        **scaling,
        "ray_actor_options": {"num_cpus": config.threads or 1},
        # Serve's default of 5 would starve continuous batching: admit the running batch plus a queue.
        "max_ongoing_requests": config.max_num_seqs + options.max_queued_requests,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": options.shutdown_timeout,
        "request_router_config": RequestRouterConfig(
            request_router_class=f"{router.__module__}.{router.__qualname__}",
            request_router_kwargs={"imbalance_threshold": max(4, config.max_num_seqs // 4)},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S, request_routing_stats_timeout_s=10.0),
    }


def start_cluster(config: EngineConfig, options: ClusterOptions):
    """Ray up, the replicas deployed and healthy; returns the `ClusterEngine` the API layer serves from."""
    require_ray()
    import ray
    from ray import serve

    from textcomplete.cluster.board import board_for
    from textcomplete.cluster.engine import ClusterEngine
    from textcomplete.cluster.replica import EngineReplica
    local = options.ray_address is None
    if local:
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE,
                 namespace=APP_NAME, configure_logging=False)
    else:
        ray.init(address=options.ray_address, namespace=APP_NAME, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")   # the front end is this process, not a Serve proxy
        deployment = serve.deployment(EngineReplica, **deployment_options(config, options))
        log.info("starting %d engine replica(s) on Ray (%s)", options.replicas,
                 "local instance" if local else options.ray_address)
        handle = serve.run(deployment.bind(config), name=APP_NAME, route_prefix=None)
        description = handle.describe.remote().result()
    except BaseException:
        _stop(local)
        raise
    log.info("engine replicas ready: %s", ", ".join(f"{k}={v}" for k, v in serve.status().applications[APP_NAME]
                                                 .deployments["engine"].replica_states.items()))
    return ClusterEngine(handle, description, board_for(APP_NAME), options.bounds[1], lambda: _stop(local))


def _stop(local: bool) -> None:
    """Drain and stop the replicas (Serve waits for their requests), then leave Ray; a local instance stops."""
    import ray
    from ray import serve
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)   # the cluster and its other applications stay
    except Exception:   # noqa: BLE001 - still leave Ray
        log.exception("stopping the engine replicas failed")
    finally:
        ray.shutdown()
