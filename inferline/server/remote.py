"""The commands that talk to a running deployment over HTTP, with the Python client (inferline.client): predict,
generate, models (the table), top, status and down. --url and --api-key default to INFERLINE_URL and
INFERLINE_API_KEY; `status` and `down` find a running `inferline up` from its state file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import httpx

from inferline.client import APIConnectionError, APIError, Client
from inferline.server import top
from inferline.server.config import ConfigError, Settings
from inferline.server.supervisor import read_state


def client_of(args: argparse.Namespace) -> Client:
    # httpx logs every request at INFO: on a terminal that would scroll `top` away and interleave with `generate`.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return Client(args.url, args.api_key, timeout=args.timeout)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="the gateway (default: INFERLINE_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="API key (default: INFERLINE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per try (default 60)")


def guarded(run: Any) -> Any:
    """A command whose client errors print as one line (exit 1) instead of a traceback."""
    def command(args: argparse.Namespace) -> int:
        try:
            code: int = run(args)
            return code
        except APIError as exc:
            print(f"inferline: {exc}", file=sys.stderr)
            return 1
        except APIConnectionError as exc:
            print(f"inferline: {exc}", file=sys.stderr)
            return 1
    return command


@guarded
def cmd_predict(args: argparse.Namespace) -> int:
    """inferline predict MODEL '{"field": ...}' (or @file.json, or - for stdin): the answer as JSON."""
    text = sys.stdin.read() if args.row == "-" else args.row
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"predict: the request is not JSON ({exc})") from None
    if not isinstance(row, dict):
        raise ConfigError("predict: the request must be a JSON object (one row of the model's request type)")
    with client_of(args) as client:
        answer = client.predict(args.model, row)
    print(json.dumps(answer.model_dump(), indent=2))
    return 0


@guarded
def cmd_generate(args: argparse.Namespace) -> int:
    """inferline generate "prompt": tokens printed as they come; the finish reason on stderr."""
    with client_of(args) as client:
        for event in client.generate_stream(args.prompt, args.max_new_tokens, temperature=args.temperature,
                                            do_sample=args.temperature is not None, seed=args.seed,
                                            stop=args.stop or ()):
            if not event.token.special:
                sys.stdout.write(event.token.text)
                sys.stdout.flush()
            if event.details is not None:
                print()
                print(f"[{event.details.finish_reason}, {event.details.generated_tokens} tokens]", file=sys.stderr)
    return 0


def scrape(client: Client) -> top.Scrape:
    response = httpx.get(client.url + "/metrics", headers=client.options.headers, timeout=10)
    response.raise_for_status()
    return top.parse(response.text, time.monotonic())


@guarded
def cmd_list(args: argparse.Namespace) -> int:
    """inferline models: one line per served model (p50 latency since the gateway started)."""
    with client_of(args) as client:
        models = client.models()
        metrics = scrape(client)
    body = [[card.id, card.version or "-", top.versions_cell(getattr(card, "versions", None) or []), card.task or "-",
             f"{card.live_replicas}/{card.replicas}", ",".join(card.devices) or "-", str(card.queue_depth),
             top.ms(top.quantile(0.5, metrics.buckets.get(card.id, {})))] for card in models]
    print(top.table(["MODEL", "VERSION", "VERSIONS", "TASK", "LIVE", "DEVICE", "QUEUE", "P50_MS"], body))
    return 0


def admin_call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One admin call to the gateway (the key from --api-key / INFERLINE_API_KEY). Raises APIError's kin through
    `guarded` callers: a non-2xx answer prints its error line."""
    with client_of(args) as client:
        response = httpx.request(method, client.url + path, json=body, headers=client.options.headers,
                                 timeout=args.timeout)
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise AdminRefused(f"{method} {path}: {response.status_code} {message}")
    found: dict[str, Any] = response.json()
    return found


class AdminRefused(Exception):
    """The gateway refused an admin call (the message has its status and error)."""


def print_rollout(state: dict[str, Any]) -> None:
    weights = ", ".join(f"{v}: {w}%" for v, w in state["weights"].items())
    print(f"{state['model']}: {state['from_version']} -> {state['to_version']} {state['state']} ({weights})"
          + (f"; {state['reason']}" if state.get("reason") else ""))


def admin_command(run: Any) -> Any:
    def command(args: argparse.Namespace) -> int:
        try:
            code: int = run(args)
            return code
        except (AdminRefused, httpx.HTTPError) as exc:
            print(f"inferline: {exc}", file=sys.stderr)
            return 1
    return command


@admin_command
def cmd_rollout(args: argparse.Namespace) -> int:
    """inferline rollout NAME VERSION [--canary P] [--wait]: start a rollout (POST /admin/models/NAME/rollout)."""
    body: dict[str, Any] = {"version": args.version}
    if args.canary is not None:
        body["canary_percent"] = args.canary
    state = admin_call(args, "POST", f"/admin/models/{args.name}/rollout", body)
    print_rollout(state)
    return wait_rollout(args, state) if args.wait else 0


def wait_rollout(args: argparse.Namespace, state: dict[str, Any]) -> int:
    """Poll until the rollout settles (done, rolled back, or a canary waiting for promote)."""
    while state["state"] not in ("done", "rolled_back", "abandoned", "canary"):
        time.sleep(1.0)
        state = admin_call(args, "GET", f"/admin/models/{args.name}/rollout")
    print_rollout(state)
    return 1 if state.get("automatic_rollback") else 0   # the new version failed: a script may stop here


@admin_command
def cmd_rollback(args: argparse.Namespace) -> int:
    """inferline rollback NAME: roll out the version served before (or back out of a rollout in progress)."""
    state = admin_call(args, "GET", f"/admin/models/{args.name}/rollout")
    back = state["from_version"]   # a finished rollout: the version before it; one in progress: backed out
    if state["state"] in ("rolled_back", "abandoned"):
        print(f"inferline: {args.name}'s last rollout is already {state['state']}; it serves "
              f"{state['from_version']}", file=sys.stderr)
        return 1
    state = admin_call(args, "POST", f"/admin/models/{args.name}/rollout", {"version": back})
    print_rollout(state)
    return wait_rollout(args, state) if args.wait else 0


@admin_command
def cmd_promote(args: argparse.Namespace) -> int:
    """inferline promote NAME: finish a canary."""
    print_rollout(admin_call(args, "POST", f"/admin/models/{args.name}/promote"))
    return 0


@admin_command
def cmd_scale(args: argparse.Namespace) -> int:
    """inferline scale NAME N: set the replicas (the supervisor of `inferline up` / `serve` starts or drains)."""
    answer = admin_call(args, "POST", f"/admin/models/{args.name}/scale", {"replicas": args.replicas})
    print(f"{answer['model']}: {answer['replicas']} replica(s) wanted of version {answer['version'] or '-'} "
          f"({answer['live_replicas']} live now)")
    return 0


@guarded
def cmd_top(args: argparse.Namespace) -> int:
    """inferline top: the per-model view, redrawn every --interval seconds (--once: one frame after one interval)."""
    if not args.once:
        # Ctrl-C ends the live view at once. A KeyboardInterrupt would land wherever the loop is, inside httpx or in
        # the middle of a frame's write, and unwind from there: a frame cut short is flushed on the way out, into a
        # terminal that may no longer read, and top did not exit (seen in tests/test_cli.py, twice in a few runs).
        # The view keeps nothing to save or flush.
        signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    with client_of(args) as client:
        before = scrape(client)
        try:
            while True:
                time.sleep(args.interval)
                now = scrape(client)
                frame = top.render(top.rows(client.models(), now, before), client.url, args.interval)
                if not args.once:
                    sys.stdout.write("\x1b[H\x1b[2J")   # home and clear: a full redraw per frame
                print(frame, flush=True)
                if args.once:
                    return 0
                before = now
        except KeyboardInterrupt:
            return 0


def cmd_status(args: argparse.Namespace) -> int:
    """inferline status: is an `inferline up` running from here, and is it ready (each model's state)."""
    state = read_state(Settings.load(args.config).state_dir)
    if state is None:
        print("inferline: no `inferline up` is running from this directory")
        return 3
    print(f"inferline up: pid {state['pid']}, gateway {state['url']}, logs {state['logs']}")
    with Client(args.url or state["url"], args.api_key, timeout=10, retries=0) as client:
        try:
            health = client.health()
            models = client.models()
        except (APIError, APIConnectionError) as exc:
            print(f"gateway not answering: {exc}")
            return 1
    print("ready" if health.ready else "not ready: " + "; ".join(health.missing))
    for card in models:
        state_ = "ready" if card.live_replicas >= max(1, card.replicas) else \
            "loading" if card.live_replicas == 0 else "partly ready"
        print(f"  {card.id}: {state_} ({card.live_replicas}/{card.replicas} live, version {card.version or '-'})")
    return 0 if health.ready else 1


def cmd_down(args: argparse.Namespace) -> int:
    """inferline down: ask the running `inferline up` to drain and stop (SIGTERM), and wait for it."""
    state = read_state(Settings.load(args.config).state_dir)
    if state is None:
        print("inferline: no `inferline up` is running from this directory")
        return 3
    pid = int(state["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("inferline: the recorded `inferline up` is gone")
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if not running(pid):
            print(f"inferline: stopped (pid {pid})")
            return 0
        time.sleep(0.2)
    print(f"inferline: pid {pid} still draining after {args.wait:g} s", file=sys.stderr)
    return 1


def running(pid: int) -> bool:
    """The process exists and has not exited (an exited one may linger as a zombie until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True   # no /proc (not Linux): kill(0) is all we know


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register predict, generate, top, status and down (models' table is added with `models`)."""
    pr = sub.add_parser("predict", parents=[common], help="run a model on one request (JSON) and print the answer")
    pr.add_argument("model")
    pr.add_argument("row", nargs="?", default="-", help="JSON object, @file.json, or - for stdin (default)")
    add_client_options(pr)
    pr.set_defaults(func=cmd_predict)
    gn = sub.add_parser("generate", parents=[common], help="generate text, streamed to the terminal")
    gn.add_argument("prompt")
    gn.add_argument("--max-new-tokens", type=int, default=64)
    gn.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    gn.add_argument("--seed", type=int)
    gn.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    add_client_options(gn)
    gn.set_defaults(func=cmd_generate)
    tp = sub.add_parser("top", parents=[common], help="a live per-model view: req/s, queue, batch, p50/p99")
    tp.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default 2)")
    tp.add_argument("--once", action="store_true", help="print one frame and exit")
    add_client_options(tp)
    tp.set_defaults(func=cmd_top)
    st = sub.add_parser("status", parents=[common], help="is `inferline up` running here, and ready")
    add_client_options(st)
    st.set_defaults(func=cmd_status)
    ro = sub.add_parser("rollout", parents=[common], help="roll a model out to another store version (canary with "
                        "--canary P); it rolls back by itself if the new version fails")
    ro.add_argument("name")
    ro.add_argument("version")
    ro.add_argument("--canary", type=int, help="send only this percent of the requests to it until `promote`")
    ro.add_argument("--wait", action="store_true", help="wait until it is done, rolled back or a canary")
    add_client_options(ro)
    ro.set_defaults(func=cmd_rollout)
    rb = sub.add_parser("rollback", parents=[common], help="back to the version served before the last rollout")
    rb.add_argument("name")
    rb.add_argument("--wait", action="store_true", help="wait until it is done")
    add_client_options(rb)
    rb.set_defaults(func=cmd_rollback)
    pm = sub.add_parser("promote", parents=[common], help="finish a canary: all traffic to the new version")
    pm.add_argument("name")
    add_client_options(pm)
    pm.set_defaults(func=cmd_promote)
    sc = sub.add_parser("scale", parents=[common], help="set a model's replicas at run time (0: requests wait)")
    sc.add_argument("name")
    sc.add_argument("replicas", type=int)
    add_client_options(sc)
    sc.set_defaults(func=cmd_scale)
    dn = sub.add_parser("down", parents=[common], help="stop the `inferline up` running here (drains first)")
    dn.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it to stop (default 60)")
    dn.set_defaults(func=cmd_down)
