"""`client.admin`: the management API, on both clients (sync and async share every line, as api.API does). Each call
needs a key with the `admin` scope once keys exist (from loopback without one while none exists); the result types
are the gateway's own wire models (server/schemas/admin.py) with the request id.

    with Client("http://127.0.0.1:8000", api_key=ADMIN_KEY) as client:
        for d in client.admin.deployments():
            print(d.name, d.live_replicas, [w.version for w in d.workers])
        client.admin.scale("cnn", 3)
        listed = client.admin.dead_letters("cnn")            # metadata only, never payloads
        client.admin.replay_dead_letters("cnn")              # each queued again; the outcomes come back here
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import orjson

from inferline.client.calls import Answer, AsyncRunner, Call, Request, SyncRunner, endpoint
from inferline.client.types import Result
from inferline.server.schemas import admin as wire
from inferline.server.schemas import responses as answers

T = TypeVar("T")
R = TypeVar("R", bound=Result)
OK = frozenset({200, 202})


class Deployments(Result, wire.DeploymentList):
    """GET /admin/deployments: each deployment with its replicas; iterate it, or index it by name."""

    def __iter__(self) -> Iterator[wire.Deployment]:   # type: ignore[override]  # the deployments, not the fields
        return iter(self.deployments)

    def __getitem__(self, name: str) -> wire.Deployment:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)


class WorkerDrain(Result, wire.WorkerDrain):
    pass


class DeadLetters(Result, wire.DeadLetterList):
    pass


class Replay(Result, wire.ReplayResult):
    pass


class Purge(Result, wire.PurgeResult):
    pass


class RepositoryIndex(Result):
    """POST /v2/repository/index: Triton's list of {name, version, state, reason}, as `models`."""

    models: list[wire.RepositoryModel]


class RolloutState(Result, answers.RolloutState):
    """A model's current or last rollout: versions, weights, live replicas, requests and failures per version, and
    why an automatic rollback happened (`reason`)."""


class ScaleAnswer(Result, answers.ScaleAnswer):
    pass


def read(result: type[R]) -> Callable[[Answer], R]:
    def parse(answer: Answer) -> R:
        out = result.model_validate_json(answer.body)
        out._request_id = answer.request_id
        return out
    return parse


def read_index(answer: Answer) -> RepositoryIndex:
    out = RepositoryIndex(models=orjson.loads(answer.body))
    out._request_id = answer.request_id
    return out


def nothing(answer: Answer) -> None:
    return None


def model_path(model: str) -> str:
    return f"/admin/models/{quote(model, safe='')}"


class AdminAPI:
    """The management API's calls, built once for both runners."""

    # deployments and workers -----------------------------------------------------------------------------------
    @endpoint
    def deployments(self) -> Call[Deployments]:
        """Each deployment: replicas wanted, configured and live; each worker's id, device, version, pid, host,
        batches; queue depth, pending entries and the oldest's age; dead letters."""
        return Call(Request("GET", "/admin/deployments"), read(Deployments))

    @endpoint
    def drain(self, worker_id: str) -> Call[WorkerDrain]:
        """Drain one worker (ids from deployments()): it takes nothing new, answers what it holds and exits. Under
        `inferline up` the supervisor starts a fresh one in its place (scale to change the count)."""
        return Call(Request("POST", f"/admin/workers/{quote(worker_id, safe='')}/drain"), read(WorkerDrain), OK)

    @endpoint
    def scale(self, model: str, replicas: int) -> Call[ScaleAnswer]:
        """Set a deployment's replicas at run time (0 allowed: requests then wait in the queue)."""
        return Call(Request("POST", model_path(model) + "/scale", json={"replicas": replicas}), read(ScaleAnswer), OK)

    # rollouts --------------------------------------------------------------------------------------------------
    @endpoint
    def rollout(self, model: str, version: str, canary_percent: int | None = None) -> Call[RolloutState]:
        """Start serving `version`: all traffic once its workers are live, or `canary_percent` of it (until
        promote()); it rolls back by itself if the new version fails (rollout_status() says why)."""
        body: dict[str, Any] = {"version": version}
        if canary_percent is not None:
            body["canary_percent"] = canary_percent
        return Call(Request("POST", model_path(model) + "/rollout", json=body), read(RolloutState), OK)

    @endpoint
    def rollout_status(self, model: str) -> Call[RolloutState]:
        """The rollout's state: versions, weights, live replicas, requests and failures per version, and why an
        automatic rollback happened."""
        return Call(Request("GET", model_path(model) + "/rollout"), read(RolloutState))

    @endpoint
    def promote(self, model: str) -> Call[RolloutState]:
        """Finish a canary: all traffic to the new version."""
        return Call(Request("POST", model_path(model) + "/promote"), read(RolloutState), OK)

    # dead letters ----------------------------------------------------------------------------------------------
    @endpoint
    def dead_letters(self, model: str, limit: int = 100) -> Call[DeadLetters]:
        """The model's dead letters, oldest first (at most `limit`): id, request id, op, tries, reason. Never a
        payload."""
        return Call(Request("GET", model_path(model) + "/dead-letters", params={"limit": str(limit)}),
                    read(DeadLetters))

    @endpoint
    def replay_dead_letters(self, model: str, ids: Sequence[str] = (), limit: int = 100) -> Call[Replay]:
        """Queue dead letters again (these ids, or the oldest `limit`), one at a time, each as a new request whose
        outcome (ok, or its error) comes back in this answer; answered ones leave the dead letters."""
        return Call(Request("POST", model_path(model) + "/dead-letters/replay",
                            json={"ids": list(ids), "limit": limit}), read(Replay))

    @endpoint
    def purge_dead_letters(self, model: str, ids: Sequence[str] = ()) -> Call[Purge]:
        """Delete dead letters (these ids, or all) and their kept payloads."""
        return Call(Request("POST", model_path(model) + "/dead-letters/purge", json={"ids": list(ids)}),
                    read(Purge))

    # the Open Inference Protocol's repository extension ----------------------------------------------------------
    @endpoint
    def repository_index(self, ready: bool = False) -> Call[RepositoryIndex]:
        """Triton's repository index: each deployment's versions and states (READY, UNAVAILABLE, UNLOADING)."""
        return Call(Request("POST", "/v2/repository/index", json={"ready": ready}), read_index)

    @endpoint
    def load(self, model: str) -> Call[None]:
        """Start the model's configured replicas; returns once one is live."""
        return Call(Request("POST", f"/v2/repository/models/{quote(model, safe='')}/load"), nothing)

    @endpoint
    def unload(self, model: str) -> Call[None]:
        """Drain and stop the model's workers (they answer what they hold); returns once none is live."""
        return Call(Request("POST", f"/v2/repository/models/{quote(model, safe='')}/unload"), nothing)


class Admin(AdminAPI, SyncRunner):
    """`Client.admin`: runs each call on its client."""

    def __init__(self, run: Callable[[Call[Any]], Any]) -> None:
        self._runner = run

    def _run(self, call: Call[T]) -> T:
        result: T = self._runner(call)
        return result


class AsyncAdmin(AdminAPI, AsyncRunner):
    """`AsyncClient.admin`: each call is awaited."""

    def __init__(self, run: Callable[[Call[Any]], Any]) -> None:
        self._runner = run

    async def _run(self, call: Call[T]) -> T:
        result: T = await self._runner(call)
        return result
