"""The `inferline` command: up, serve, gateway, worker, models build."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from service.config import ConfigError, Settings


def cmd_up(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    if args.port is not None:
        settings.gateway.port = args.port
        os.environ["INFERLINE_GATEWAY__PORT"] = str(args.port)
    if not args.no_build:
        build_missing(settings, quick=args.quick)
    return supervise(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve one Model class: a private Redis, a gateway and its workers, from a config written for it."""
    target: str = args.target
    module, _, class_name = target.rpartition(":")
    if not module or not class_name:
        raise ConfigError(f"serve {target!r}: expected FILE.py:Class or package.module:Class")
    if module.endswith(".py"):
        if not Path(module).is_file():
            raise ConfigError(f"serve {target!r}: {module} does not exist")
        target = f"{Path(module).resolve()}:{class_name}"
    name = args.name or class_name.lower()
    state = Path(".inferline")
    state.mkdir(exist_ok=True)
    config = state / "serve.toml"
    model = {"model": target, "replicas": args.replicas, "device": args.device, "artifact": args.artifact,
             "task": args.task}
    config.write_text(f"state_dir = {json.dumps(str(state))}\n[gateway]\nport = {args.port}\n[models.{name}]\n"
                      + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items() if v is not None))
    os.environ["INFERLINE_CONFIG"] = str(config)
    print(f"inferline: serving {target} as model {name!r}: POST /v1/models/{name}/predict, /v2/models/{name}/infer",
          flush=True)
    return supervise(Settings.load(config))


def supervise(settings: Settings) -> int:
    """Run the gateway and every worker under the supervisor, with a private Redis unless REDIS_URL is set."""
    from service.broker import embedded
    from service.supervisor import Supervisor

    redis_proc: subprocess.Popen[bytes] | None = None
    redis_url = settings.redis_url
    if not redis_url:
        redis_proc, redis_url = embedded.start(settings.state_dir / "redis")
        print(f"inferline: started a private Redis at {redis_url} (set REDIS_URL to use your own)", flush=True)
    try:
        return Supervisor(settings, redis_url).run()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)


def build_missing(settings: Settings, quick: bool) -> None:
    """Build the demo models a configured deployment needs and the store lacks (the zoo's, by name)."""
    from models import store
    from models.build import KNOWN

    wanted = [name for name, spec in settings.models.items()
              if spec.replicas > 0 and name in KNOWN and spec.artifact is not None
              and not spec.options.get("source")
              and Path(spec.artifact).resolve().parent == settings.model_store.resolve()
              and store.latest(settings.model_store.resolve(), name) is None]
    if wanted:
        print(f"inferline: building demo models {wanted} into {settings.model_store} (once)", flush=True)
        code = subprocess.call([sys.executable, "-m", "models.build", "--store", str(settings.model_store),
                                *(["--quick"] if quick else []), *wanted])
        if code != 0:
            raise ConfigError(f"building {wanted} failed (exit {code})")


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from service.gateway.app import create_app

    settings = Settings.load(args.config)
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is not set: the gateway needs the Redis its workers use (or run `inferline up`)")
    host = args.host or settings.gateway.host
    port = args.port or settings.gateway.port
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False,
                loop="auto", http="auto", timeout_graceful_shutdown=10)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.worker.main import main as worker_main

    return worker_main([*([args.model] if args.model else []), *(["--config", args.config] if args.config else []),
                        "--replica", str(args.replica)])


def cmd_models(args: argparse.Namespace) -> int:
    from models.build import main as build_main

    settings = Settings.load(args.config)
    store = args.store or str(settings.model_store)
    return build_main(["--store", store, *(["--quick"] if args.quick else []), *(["--force"] if args.force else []),
                       *args.names])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferline", description="Serve models: gateway -> Redis -> workers.")
    parser.add_argument("--config", help="config file (default: INFERLINE_CONFIG or ./inferline.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="Redis + models + gateway + workers, supervised")
    up.add_argument("--port", type=int, help="gateway port")
    up.add_argument("--no-build", action="store_true", help="do not build missing demo models")
    up.add_argument("--quick", action="store_true", help="build missing demo models in their seconds-long form")
    up.set_defaults(func=cmd_up)
    sv = sub.add_parser("serve", help="serve one Model class (FILE.py:Class or package.module:Class), supervised")
    sv.add_argument("target", help="FILE.py:Class or package.module:Class")
    sv.add_argument("--name", help="the model's name in routes (default: the class name, lowercased)")
    sv.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    sv.add_argument("--artifact", help="a directory the model's setup reads (self.artifact)")
    sv.add_argument("--task", help="also bind a task route to it, e.g. classify-image")
    sv.set_defaults(func=cmd_serve)
    gw = sub.add_parser("gateway", help="run the HTTP gateway (needs REDIS_URL)")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)
    gw.set_defaults(func=cmd_gateway)
    wk = sub.add_parser("worker", help="run one replica of a model (needs REDIS_URL)")
    wk.add_argument("model")
    wk.add_argument("--replica", type=int, default=0)
    wk.set_defaults(func=cmd_worker)
    md = sub.add_parser("models", help="the model zoo")
    md_sub = md.add_subparsers(dest="models_command", required=True)
    build = md_sub.add_parser("build", help="build the demo models that are missing from the store")
    build.add_argument("names", nargs="*", help="models to build (default: all)")
    build.add_argument("--store", help="model store directory (default: settings.model_store)")
    build.add_argument("--quick", action="store_true", help="seconds-long builds (tests)")
    build.add_argument("--force", action="store_true", help="build even if a version exists")
    build.set_defaults(func=cmd_models)
    args = parser.parse_args(argv)
    if args.config:
        os.environ["INFERLINE_CONFIG"] = args.config
    logging.basicConfig(level=os.environ.get("INFERLINE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"inferline: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
