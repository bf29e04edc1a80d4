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
    body = [[card.id, card.version or "-", card.task or "-", f"{card.live_replicas}/{card.replicas}",
             ",".join(card.devices) or "-", str(card.queue_depth),
             top.ms(top.quantile(0.5, metrics.buckets.get(card.id, {})))] for card in models]
    print(top.table(["MODEL", "VERSION", "TASK", "LIVE", "DEVICE", "QUEUE", "P50_MS"], body))
    return 0


@guarded
def cmd_top(args: argparse.Namespace) -> int:
    """inferline top: the per-model view, redrawn every --interval seconds (--once: one frame after one interval)."""
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
    dn = sub.add_parser("down", parents=[common], help="stop the `inferline up` running here (drains first)")
    dn.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it to stop (default 60)")
    dn.set_defaults(func=cmd_down)
