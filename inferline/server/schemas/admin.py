"""Wire models of the management API: the Open Inference Protocol's model repository extension (as Triton defines it:
POST /v2/repository/index, .../models/{name}/load, .../unload) and inferline's own /admin routes (deployments, worker
drain, dead letters). One spelling per answer: the routes build these (gateway/routes/admin.py, repository.py), the API
document shows them, the SDK's `client.admin` returns them. Pydantic only (the SDK imports this module with the core
install). No model here carries a request's payload: a dead letter is listed by its metadata alone."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Triton's repository states: READY (serving), UNAVAILABLE (configured, not serving), LOADING (starting replicas),
# UNLOADING (draining).
RepositoryState = Literal["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]


class RepositoryIndexRequest(BaseModel):
    """POST /v2/repository/index's body (optional). ready: list only the models that can serve now."""

    model_config = ConfigDict(extra="forbid")
    ready: bool = False


class RepositoryModel(BaseModel):
    """One entry of the repository index, Triton's shape. `version` is the version the live workers serve ("" when
    none runs); `reason` says why a model is not READY ("" when it is)."""

    name: str
    version: str = ""
    state: RepositoryState
    reason: str = ""


class RepositoryLoadRequest(BaseModel):
    """POST /v2/repository/models/{name}/load's body (optional). Triton's `parameters` may carry a model
    configuration or model files (`config`, `file:<path>`): inferline loads deployments from its own configuration
    and store, so those are refused (400) rather than ignored."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, Any] = Field(default_factory=dict)


class RepositoryUnloadRequest(BaseModel):
    """POST /v2/repository/models/{name}/unload's body (optional). `unload_dependents` (Triton's ensembles) has no
    meaning here and is accepted for compatibility."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, Any] = Field(default_factory=dict)


class Replica(BaseModel):
    """One worker process of a deployment, from its heartbeat record (broker/registry.py)."""

    id: str = Field(description="the worker id (its consumer name on the request stream); drain it by this id")
    live: bool = Field(description="its heartbeat has not lapsed")
    draining: bool = Field(description="asked to drain (POST /admin/workers/{id}/drain): it takes no new work")
    device: str
    version: str
    pid: int
    host: str
    batches: int = Field(description="batches served since it started")
    items: int = Field(description="requests served since it started")
    started: int = Field(description="epoch ms")
    beat: int = Field(description="epoch ms of its last heartbeat")


class Deployment(BaseModel):
    """One configured deployment: what is wanted, what runs, and how its queue stands."""

    name: str
    task: str | None = None
    replicas: int = Field(description="the replicas wanted now: the run-time value (scale, load, unload) when one "
                                      "was set, else the configuration's")
    configured_replicas: int
    live_replicas: int
    versions: list[str] = Field(description="the versions its live workers serve")
    queue_depth: int = Field(description="entries on the request stream, delivered or not")
    pending: int = Field(description="entries delivered to a worker and not yet answered")
    oldest_pending_age_s: float
    oldest_queued_age_s: float
    dead_letters: int
    workers: list[Replica] = Field(description="its worker processes, live or draining")


class DeploymentList(BaseModel):
    deployments: list[Deployment]


class WorkerDrain(BaseModel):
    """The answer to POST /admin/workers/{id}/drain: the worker reads the flag with its next heartbeat (within about
    a second), takes nothing new, answers what it holds and exits."""

    worker: str
    model: str
    draining: bool = True


class DeadLetter(BaseModel):
    """One dead-lettered request: its metadata, never its payload."""

    id: str = Field(description="the dead-letter entry's id: replay or purge it by this id")
    request_id: str
    op: str
    tries: int = Field(description="how many times a worker was given it")
    reason: str = Field(description="why it was dead-lettered (the error)")
    at_ms: int = Field(description="when it was dead-lettered, epoch ms")
    replayable: bool = Field(description="its payload was kept (up to dead_letter_payload_bytes), so it can be "
                                         "replayed")


class DeadLetterList(BaseModel):
    model: str
    total: int = Field(description="entries on the model's dead-letter stream")
    entries: list[DeadLetter] = Field(description="oldest first, at most `limit`")


class ReplayRequest(BaseModel):
    """POST /admin/models/{name}/dead-letters/replay's body: the ids to replay, or none for all (at most
    `limit`, oldest first)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(default_factory=list, max_length=1000)
    limit: int = Field(default=100, ge=1, le=1000)


class ReplayOutcome(BaseModel):
    """What became of one replayed dead letter. The replay is a new request whose answer comes back to the replay
    call (the original caller was answered 500 dead_letter long ago): `ok` when a worker answered it, else the error
    it met (it is then dead-lettered again as a new entry). The answer's body is not returned."""

    id: str
    request_id: str = Field(description="the replayed request's new id")
    ok: bool
    error_type: str = ""
    error: str = ""


class ReplayResult(BaseModel):
    model: str
    replayed: list[ReplayOutcome]
    skipped: dict[str, str] = Field(description="dead-letter id -> why it was not replayed (no payload kept, unknown)")


class PurgeRequest(BaseModel):
    """POST /admin/models/{name}/dead-letters/purge's body: the ids to delete, or none for all."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(default_factory=list, max_length=1000)


class PurgeResult(BaseModel):
    model: str
    purged: int
