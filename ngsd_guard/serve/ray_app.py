"""The service on Ray Serve: N replicas of :func:`~.app.create_app` behind Ray Serve's HTTP proxy.

Each replica loads the models from the same flags as ``ngsd-guard serve`` and batches its own
concurrent requests; Ray Serve's proxy spreads requests over the replicas and its autoscaler
adds or removes replicas. Nothing in the deployment is tied to one machine, so it runs
unchanged on a multi-node cluster (each node needs ngsd-guard and the model files).

From the command line::

    ngsd-guard serve --ray --replicas 2
    ngsd-guard serve --ray --autoscaling '{"min_replicas": 1, "max_replicas": 8}'

or as an importable application (``serve run``, a Ray Serve config file, or ``serve.run``)::

    serve run ngsd_guard.serve.ray_app:app_builder replicas=2
    serve.run(build_app(model_spec, settings, replicas=2), route_prefix="/")
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from ..loading import DEFAULT_MODEL_NAME
from .app import create_app
from .settings import ServeSettings

logger = logging.getLogger(__name__)

APP_NAME = "ngsd-guard"


@serve.deployment(name="GuardedService")
@serve.ingress()
class GuardedService:
    """One replica: the models, a scheduler and the FastAPI app."""

    def __init__(self, model_spec: dict[str, Any], settings: ServeSettings) -> None:
        from ..cli import load_from_args

        lm = load_from_args(argparse.Namespace(**model_spec))
        self._app = create_app(lm, settings)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose decode thread has died."""
        if not self._app.state.scheduler.alive:
            raise RuntimeError("the decode thread is not running")


def build_app(
    model_spec: dict[str, Any],
    settings: ServeSettings,
    *,
    replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    replica_resources: dict[str, Any] | None = None,
) -> Application:
    """The Ray Serve application: ``replicas`` copies, or ``autoscaling`` (Ray Serve's
    ``autoscaling_config``, passed through), each with ``replica_resources``
    (``ray_actor_options``). A replica accepts as many requests at once as its scheduler holds
    (``max_batch + max_queue``), so Ray Serve's proxy queues the rest instead of this replica
    answering 429."""
    options: dict[str, Any] = {
        "max_ongoing_requests": settings.max_batch + settings.max_queue,
        "ray_actor_options": replica_resources or {"num_cpus": 1},
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    return GuardedService.options(**options).bind(model_spec, settings)


def app_builder(args: dict[str, str]) -> Application:
    """For ``serve run ngsd_guard.serve.ray_app:app_builder key=value ...``: the keys are the
    ``ngsd-guard serve`` flags with underscores (``replicas=2 max_batch=8 model=/path``);
    switches take ``true`` or ``false`` (``allow_guard_overrides=true``)."""
    from ..cli import build_parser

    argv = ["serve", "--ray"]
    for key, value in args.items():
        flag = f"--{key.replace('_', '-')}"
        if str(value).lower() in ("true", "false"):
            argv += [flag] if str(value).lower() == "true" else []
        else:
            argv += [flag, str(value)]
    return _application(build_parser().parse_args(argv))


def _application(args: argparse.Namespace) -> Application:
    from .command import model_spec, settings_from_args

    name = Path(args.model).name if args.model else DEFAULT_MODEL_NAME
    return build_app(
        model_spec(args),
        settings_from_args(args, name),
        replicas=args.replicas,
        autoscaling=args.autoscaling,
        replica_resources=args.replica_resources,
    )


def run_on_ray(args: argparse.Namespace) -> int:
    """Deploy on Ray Serve (a local instance, or ``--ray-address``) and serve until Ctrl-C."""
    import ray

    ray.init(address=args.ray_address, ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(_application(args), name=APP_NAME, route_prefix="/")
    logger.info("Ray Serve: http://%s:%d/v1", args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
