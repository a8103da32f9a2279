"""``ngsd-guard serve``: the OpenAI-compatible service, in this process or on Ray Serve."""

from __future__ import annotations

import argparse
import json
import logging
import os

from pydantic import ValidationError

from ..errors import ConfigError
from .settings import API_KEY_ENV, ServeSettings

logger = logging.getLogger(__name__)


def model_flags() -> tuple[str, ...]:
    """The destinations of :func:`ngsd_guard.cli.add_model_options`: what each replica loads
    (read from the parser, so that a new model flag reaches the replicas too)."""
    from ..cli import add_model_options

    parser = argparse.ArgumentParser(add_help=False)
    add_model_options(parser)
    return tuple(vars(parser.parse_args([])))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..cli import add_model_options

    defaults = ServeSettings.model_fields
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible guarded endpoint",
        description=__doc__,
    )
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument(
        "--api-key",
        default=None,
        help=f"clients must send it as a bearer token (default: ${API_KEY_ENV}; none: open)",
    )
    http.add_argument(
        "--served-model-name", help="the model name clients use (default: the model's name)"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=defaults["max_batch"].default)
    limits.add_argument("--max-queue", type=int, default=defaults["max_queue"].default)
    limits.add_argument("--max-tokens-cap", type=int, default=defaults["max_tokens_cap"].default)
    limits.add_argument("--max-body-bytes", type=int, default=defaults["max_body_bytes"].default)
    limits.add_argument(
        "--join-window-ms",
        type=float,
        default=defaults["join_window_s"].default * 1000,
        help="how long a new batch waits for more requests",
    )
    limits.add_argument(
        "--allow-guard-overrides",
        action="store_true",
        help="let requests set ngsd.alpha and ngsd.guard",
    )
    ray = parser.add_argument_group("ray serve")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (without --autoscaling)")
    ray.add_argument(
        "--autoscaling",
        type=json.loads,
        default=None,
        help="Ray Serve autoscaling_config as JSON, e.g. "
        '\'{"min_replicas": 1, "max_replicas": 4}\'',
    )
    ray.add_argument(
        "--replica-resources",
        type=json.loads,
        default=None,
        help='ray_actor_options per replica as JSON, e.g. \'{"num_cpus": 2, "num_gpus": 1}\'',
    )
    ray.add_argument(
        "--ray-address", default=None, help="an existing cluster (default: $RAY_ADDRESS or local)"
    )
    add_model_options(parser)
    parser.set_defaults(handler=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace, model_name: str) -> ServeSettings:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    try:
        return ServeSettings(
            model_name=args.served_model_name or model_name,
            api_key=api_key or None,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_tokens_cap=args.max_tokens_cap,
            default_max_tokens=min(args.max_new_tokens, args.max_tokens_cap),
            max_body_bytes=args.max_body_bytes,
            join_window_s=args.join_window_ms / 1000,
            allow_guard_overrides=args.allow_guard_overrides,
        )
    except ValidationError as error:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in error.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"bad serve setting: {problems}") from None


def model_spec(args: argparse.Namespace) -> dict[str, object]:
    """The model flags, as a plain dict a Ray replica can load from."""
    return {name: getattr(args, name) for name in model_flags()}


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"`ngsd-guard serve` needs {error.name}: pip install 'ngsd-guard[serve]'"
        ) from None
    if args.ray:
        from .ray_app import run_on_ray

        return run_on_ray(args)
    from ..cli import load_from_args

    lm = load_from_args(args)
    settings = settings_from_args(args, lm.model_name)
    logger.info("serving %s on http://%s:%d/v1", settings.model_name, args.host, args.port)
    uvicorn.run(create_app(lm, settings), host=args.host, port=args.port)
    return 0
