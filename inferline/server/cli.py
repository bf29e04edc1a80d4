"""The `inferline` command: up, serve, gateway, worker, keys, models build; and, against a running deployment over
HTTP (server/remote.py): predict, generate, models (the table), top, status, down. `--config` goes before or after
the command."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from inferline.server import logs, tracing
from inferline.server.config import ConfigError, Settings


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
                      + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items() if v is not None)
                      + autoscale_table(args.autoscale))
    os.environ["INFERLINE_CONFIG"] = str(config)
    print(f"inferline: serving {target} as model {name!r}: POST /v1/models/{name}/predict, /v2/models/{name}/infer",
          flush=True)
    return supervise(Settings.load(config))


def autoscale_table(bounds: str | None) -> str:
    """serve --autoscale MIN:MAX as the deployment's autoscale line ("" without it: the autoscaler stays off)."""
    if not bounds:
        return ""
    low, sep, high = bounds.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ConfigError(f"serve --autoscale {bounds!r}: expected MIN:MAX replicas, e.g. 0:2")
    return f"autoscale = {{ enabled = true, min_replicas = {int(low)}, max_replicas = {int(high)} }}\n"


def supervise(settings: Settings) -> int:
    """Run the gateway and every worker under the supervisor, with a private Redis (supervised like them) unless
    REDIS_URL is set."""
    from inferline.server.gateway.security import describe
    from inferline.server.supervisor import Supervisor

    print(f"inferline: {describe(settings)}", flush=True)
    return Supervisor(settings, settings.redis_url or None).run()


def build_missing(settings: Settings, quick: bool) -> None:
    """Build the demo models a configured deployment needs and the store lacks (the zoo's, by name)."""
    from inferline.zoo import store
    from inferline.zoo.build import KNOWN

    wanted = [name for name, spec in settings.models.items()
              if spec.replicas > 0 and name in KNOWN and spec.artifact is not None
              and not spec.options.get("source")
              and Path(spec.artifact).resolve().parent == settings.model_store.resolve()
              and store.latest(settings.model_store.resolve(), name) is None]
    if wanted:
        print(f"inferline: building demo models {wanted} into {settings.model_store} (once)", flush=True)
        code = subprocess.call([sys.executable, "-m", "inferline.zoo.build", "--store", str(settings.model_store),
                                *(["--quick"] if quick else []), *wanted])
        if code != 0:
            raise ConfigError(f"building {wanted} failed (exit {code})")


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from inferline.server.gateway.app import create_app

    settings = Settings.load(args.config)
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is not set: the gateway needs the Redis its workers use (or run `inferline up`)")
    from inferline.server.gateway.connlimits import protocol_for
    from inferline.server.gateway.security import describe

    gw = settings.gateway
    if args.host:
        gw.host = args.host   # loopback or not decides whether keys are required under security.auth = "auto"
    if args.tls_cert or args.tls_key:
        gw.tls_certfile, gw.tls_keyfile = args.tls_cert, args.tls_key
        if not (gw.tls_certfile and gw.tls_keyfile):
            raise ConfigError("--tls-cert and --tls-key go together")
    if gw.access_log and gw.access_log_file is not None:
        logs.route_access(gw.access_log_file, gw.access_log_max_bytes, gw.access_log_backups)
    tracing.setup("inferline-gateway")
    port = args.port or gw.port
    tls = {"ssl_certfile": str(gw.tls_certfile), "ssl_keyfile": str(gw.tls_keyfile)} if gw.tls_certfile else {}
    scheme = "https" if tls else "http"
    print(f"inferline gateway: {scheme}://{gw.host}:{port}; {describe(settings)}", file=sys.stderr, flush=True)
    # httptools with our per-connection limits (header bytes, count and read deadlines, each client's share of the
    # connections, and their total: uvicorn's limit_concurrency is not used, since it counts the connections turned
    # away too and answers in plain text); h11's own size bound is set too, for a machine without httptools. No
    # proxy-headers layer: the shares are by peer address, and a forwarded address is whatever the client wrote.
    uvicorn.run(create_app(settings), host=gw.host, port=port, log_level="warning", access_log=False,
                loop="auto", http=protocol_for(gw), proxy_headers=False, timeout_graceful_shutdown=10,
                timeout_keep_alive=int(math.ceil(gw.keep_alive_s)),
                h11_max_incomplete_event_size=gw.max_header_bytes, **tls)  # type: ignore[arg-type]
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """inferline keys create|list|revoke, against the Redis the gateways use."""
    import asyncio

    from inferline.server.auth import keyfile
    from inferline.server.auth.keys import ALL_MODELS, ApiKey, BadKey, new_key, parse
    from inferline.server.broker import keystore
    from inferline.server.broker.client import connect

    settings = Settings.load(args.config)
    url = settings.redis_url or private_redis_url(settings)
    if not url:
        raise ConfigError("REDIS_URL is not set and no `inferline up` Redis runs here: set REDIS_URL")
    # The private Redis of `inferline up` may lose its data: each change goes to the durable copy first, so a
    # revoked key never comes back from it (server/auth/keyfile.py). A user's Redis keeps its own.
    durable = None if settings.redis_url else keyfile.location(settings.state_dir)

    async def run() -> int:
        redis = connect(url, settings.broker.timeout_s, cluster=settings.broker.cluster)
        try:
            if args.keys_command == "create":
                try:
                    key, record = new_key(args.name or "", set(args.scope or ["infer"]),
                                          set(args.model or [ALL_MODELS]), parse_duration(args.ttl),
                                          args.rate, args.burst, args.concurrency, args.max_priority)
                except BadKey as exc:
                    raise ConfigError(str(exc)) from None
                if durable is not None:
                    keyfile.change(durable, record.key_id, record.to_fields())
                await keystore.save(redis, record.key_id, record.to_fields())
                print(key)
                print(f"inferline: created key {record.key_id}; the secret above is shown only this once",
                      file=sys.stderr)
            elif args.keys_command == "list":
                rows = await keystore.list_all(redis)
                print("id\tname\tscopes\tmodels\texpires\trate/s\tburst\tconcurrency")
                for key_id, fields in rows.items():
                    r = ApiKey.from_fields(key_id, fields)
                    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.expires_at)) if r.expires_at else "-"
                    if r.expired():
                        expires += " (expired)"
                    print(f"{key_id}\t{r.name or '-'}\t{','.join(sorted(r.scopes))}\t{','.join(sorted(r.models))}"
                          f"\t{expires}\t{r.rate_per_s or 'default'}\t{r.burst or 'default'}"
                          f"\t{r.concurrency or 'default'}")
            else:
                parsed = parse(args.key_id)
                key_id = parsed[0] if parsed else args.key_id
                if durable is not None:
                    keyfile.change(durable, key_id, None)
                if not await keystore.revoke(redis, key_id):
                    print(f"inferline: no key {key_id}", file=sys.stderr)
                    return 1
                print(f"inferline: revoked key {key_id}", file=sys.stderr)
            return 0
        finally:
            await redis.aclose()

    return asyncio.run(run())


def cmd_migrate_keys(args: argparse.Namespace) -> int:
    """inferline migrate-keys [--dry-run]: rename the keys of the layout before hash tags on the deployment's one
    Redis (broker/migrate.py). Run it with every gateway and worker stopped, then start the new version."""
    import asyncio

    from inferline.server.broker import migrate
    from inferline.server.broker.client import connect

    settings = Settings.load(args.config)
    url = settings.redis_url or private_redis_url(settings)
    if not url:
        raise ConfigError("REDIS_URL is not set and no `inferline up` Redis runs here: set REDIS_URL")
    if settings.broker.cluster:
        raise ConfigError("migrate-keys renames keys on the one Redis a deployment used before the upgrade (no "
                          "earlier version ran on a Redis Cluster): run it there, without broker.cluster")

    async def run() -> int:
        redis = connect(url, settings.broker.timeout_s)
        try:
            steps = await migrate.migrate(redis, dry_run=args.dry_run)
        finally:
            await redis.aclose()
        for step in steps:
            print(migrate.describe(step))
        done = sum(s.done for s in steps)
        print(f"inferline: {len(steps)} old key(s) found, {done} migrated", file=sys.stderr)
        return 0 if args.dry_run or done == len(steps) else 1

    return asyncio.run(run())


def private_redis_url(settings: Settings) -> str | None:
    """The URL `inferline up` wrote for its private Redis (owner-only file), if one runs from this directory."""
    from inferline.server.broker import embedded

    return embedded.read_url(settings.state_dir / "redis")


def parse_duration(text: str | None) -> float:
    """Seconds in "3600", "90m", "12h" or "30d"; None or "" is 0 (no expiry)."""
    if not text:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ConfigError(f"--ttl {text!r}: give seconds or a number with s, m, h or d") from None


def cmd_worker(args: argparse.Namespace) -> int:
    from inferline.server.worker.main import main as worker_main

    return worker_main([*([args.model] if args.model else []), *(["--config", args.config] if args.config else []),
                        "--replica", str(args.replica), *(["--version", args.version] if args.version else [])])


def cmd_models(args: argparse.Namespace) -> int:
    from inferline.zoo.build import main as build_main

    settings = Settings.load(args.config)
    store = args.store or str(settings.model_store)
    return build_main(["--store", store, *(["--quick"] if args.quick else []), *(["--force"] if args.force else []),
                       *args.names])


def cmd_models_list(args: argparse.Namespace) -> int:
    from inferline.server.remote import cmd_list

    result: int = cmd_list(args)
    return result


def main(argv: list[str] | None = None) -> int:
    from inferline import server as service

    parser = argparse.ArgumentParser(prog="inferline", description="Serve models: gateway -> Redis -> workers.")
    parser.add_argument("--config", help="config file (default: INFERLINE_CONFIG or ./inferline.toml)")
    parser.add_argument("--version", action="version", version=f"inferline {service.__version__}")
    # Every command takes --config too, after its name; SUPPRESS keeps one given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: INFERLINE_CONFIG or "
                        "./inferline.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="Redis + models + gateway + workers, supervised")
    up.add_argument("--port", type=int, help="gateway port")
    up.add_argument("--no-build", action="store_true", help="do not build missing demo models")
    up.add_argument("--quick", action="store_true", help="build missing demo models in their seconds-long form")
    up.set_defaults(func=cmd_up)
    sv = sub.add_parser("serve", parents=[common],
                        help="serve one Model class (FILE.py:Class or package.module:Class), supervised")
    sv.add_argument("target", help="FILE.py:Class or package.module:Class")
    sv.add_argument("--name", help="the model's name in routes (default: the class name, lowercased)")
    sv.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--autoscale", metavar="MIN:MAX",
                    help="let the autoscaler move the replicas between MIN and MAX (0: scale to zero when idle)")
    sv.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    sv.add_argument("--artifact", help="a directory the model's setup reads (self.artifact)")
    sv.add_argument("--task", help="also bind a task route to it, e.g. classify-image")
    sv.set_defaults(func=cmd_serve)
    gw = sub.add_parser("gateway", parents=[common], help="run the HTTP gateway (needs REDIS_URL)")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)
    gw.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM; gateway.tls_certfile)")
    gw.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM; gateway.tls_keyfile)")
    gw.set_defaults(func=cmd_gateway)
    ks = sub.add_parser("keys", parents=[common],
                        help="API keys: create, list, revoke (stored as salted hashes in Redis)")
    ks_sub = ks.add_subparsers(dest="keys_command", required=True)
    kc = ks_sub.add_parser("create", parents=[common], help="create a key and print it (shown only once)")
    kc.add_argument("--name", help="a label for people (who holds the key)")
    kc.add_argument("--scope", action="append", choices=["infer", "admin"], help="repeatable; default: infer")
    kc.add_argument("--model", action="append", help="a model the key may use (repeatable); default: all")
    kc.add_argument("--ttl", help="expire after this long: seconds, or 90m, 12h, 30d; default: never")
    kc.add_argument("--rate", type=float, default=0.0, help="requests/s (token refill); default: security.rate_per_s")
    kc.add_argument("--burst", type=int, default=0, help="bucket size; default: security.burst")
    kc.add_argument("--concurrency", type=int, default=0, help="requests in flight; default: security.concurrency")
    kc.add_argument("--max-priority", choices=["high", "normal", "low"], default="high",
                    help="the highest x-priority its requests get (higher is clamped to it); default: high")
    ks_sub.add_parser("list", parents=[common], help="list keys (ids, scopes, models, expiry, limits; never secrets)")
    kr = ks_sub.add_parser("revoke", parents=[common], help="revoke a key now, on every gateway")
    kr.add_argument("key_id", help="the key's id (or the whole key)")
    ks.set_defaults(func=cmd_keys)
    mk = sub.add_parser("migrate-keys", parents=[common],
                        help="rename the Redis keys of a deployment from before the Cluster-safe names (stop every "
                        "gateway and worker first)")
    mk.add_argument("--dry-run", action="store_true", help="only print what would be renamed or dropped")
    mk.set_defaults(func=cmd_migrate_keys)
    wk = sub.add_parser("worker", parents=[common], help="run one replica of a model (needs REDIS_URL)")
    wk.add_argument("model")
    wk.add_argument("--replica", type=int, default=0)
    wk.add_argument("--version", help="serve this store version (one worker Deployment per version under Kubernetes)")
    wk.set_defaults(func=cmd_worker)
    md = sub.add_parser("models", parents=[common], help="the served models as a table (version, replicas live, "
                        "device, queue depth, p50); `models build` builds the demo zoo")
    from inferline.server.remote import add_client_options, add_commands

    add_client_options(md)
    md.set_defaults(func=cmd_models_list)
    md_sub = md.add_subparsers(dest="models_command", required=False)
    build = md_sub.add_parser("build", parents=[common], help="build the demo models that are missing from the store")
    build.add_argument("names", nargs="*", help="models to build (default: all)")
    build.add_argument("--store", help="model store directory (default: settings.model_store)")
    build.add_argument("--quick", action="store_true", help="seconds-long builds (tests)")
    build.add_argument("--force", action="store_true", help="build even if a version exists")
    build.set_defaults(func=cmd_models)
    add_commands(sub, common)
    args = parser.parse_args(argv)
    if args.config:
        os.environ["INFERLINE_CONFIG"] = args.config
    try:
        logs.configure()
    except ValueError as exc:
        print(f"inferline: {exc}", file=sys.stderr)
        return 2
    try:
        code: int = args.func(args)
    except (ConfigError, tracing.TracingError) as exc:
        print(f"inferline: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
