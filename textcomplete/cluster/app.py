"""textcomplete as a Ray Serve application, for `serve run`, `serve deploy` and KubeRay's RayService.

The same front end as `textcomplete serve --replicas N` (the ASGI app over a `ClusterEngine`), run as the
application's HTTP ingress deployment behind Serve's proxy instead of in the CLI's process. `args` takes
one string, `serve_args`: `textcomplete serve`'s own flags (model, engine, limits, replicas, router).
"""

from __future__ import annotations

import shlex

from ray import serve

from textcomplete.cluster.board import board_for
from textcomplete.cluster.engine import ClusterEngine
from textcomplete.cluster.launch import deployment_options
from textcomplete.cluster.options import cluster_options
from textcomplete.cluster.replica import EngineReplica


@serve.ingress()
class Frontend:
    """The API front end as a Serve replica; it builds its app once the engine replicas can describe themselves."""

    def __init__(self, engine, serve_args: list[str]) -> None:
        self._engine, self._argv = engine, serve_args

    async def __serve_build_asgi_app__(self):
        from textcomplete.api.server import build_app
        from textcomplete.api.serving import CompletionService
        from textcomplete.cli import serve_settings
        args, keys, limits, _, names = serve_settings(self._argv)
        description = await self._engine.describe.remote()
        board = board_for(serve.get_replica_context().app_name)
        engine = ClusterEngine(self._engine, description, board, cluster_options(args, limits).bounds[1],
                               close=lambda: None)   # Serve owns the replicas' lifetime here
        service = CompletionService(engine, names, limits)
        app = build_app(service, keys, playground=args.playground)
        for collector in engine.collectors():
            service.metrics.registry.register(collector)
        return app


def build(args: dict) -> serve.Application:
    """The application builder (`import_path: textcomplete.cluster.app:build`)."""
    from textcomplete.cli import serve_settings
    argv = shlex.split(args.get("serve_args", ""))
    parsed, _, limits, config, _ = serve_settings(argv)
    engine = serve.deployment(EngineReplica, **deployment_options(config, cluster_options(parsed, limits)))
    frontend = serve.deployment(Frontend, name="frontend", ray_actor_options={"num_cpus": 0},
                                max_ongoing_requests=10_000)   # its own admission answers 429 long before
    return frontend.bind(engine.bind(config), argv)
