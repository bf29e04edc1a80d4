"""Configuration: one TOML file declares the deployments; INFERLINE_* environment variables override it.

    [gateway]
    port = 8000
    [models.cnn]
    replicas = 1
    device = "cpu"            # "cpu" | "cuda" | "cuda:N" | "auto" (round-robin over visible GPUs)
    max_batch_size = 32

Override any key from the environment with `__` between levels: INFERLINE_MODELS__CNN__REPLICAS=2,
INFERLINE_GATEWAY__PORT=9000. REDIS_URL (or INFERLINE_REDIS_URL) picks the Redis; unset means
`inferline up` starts a private one. A bad value fails at start with a message naming its key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from inferline.server.schemas.fleet import VERSION_PATTERN

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")
# Task routes a deployment can be bound to: image and text classifiers, forecasters, and text generation (the TGI
# routes /generate, /generate_stream and /). Generic routes (/v1/models/{name}/predict, /v2) serve every deployment.
TASKS = ("classify-image", "forecast", "sentiment", "classify-text", "generate")
DEFAULT_CONFIG = "inferline.toml"


class ConfigError(Exception):
    """A configuration that cannot run; the message names the key."""


class AutoscaleSpec(BaseModel):
    """A deployment's replica bounds and how eagerly the backlog moves it between them (server/backlog.py computes
    the replicas wanted; the supervisor of `inferline up`/`serve` acts on it only when `enabled`). The bounds also
    clamp the desired-replicas gauge that /metrics exports whether or not the autoscaler runs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    min_replicas: int = Field(1, ge=0, le=64)          # 0: scale to zero when idle
    max_replicas: int = Field(4, ge=1, le=64)
    # How long a request may wait on the stream before more replicas are wanted: the backlog is drained in this long.
    target_queue_s: float = Field(2.0, gt=0, le=3600)
    up_delay_s: float = Field(5.0, ge=0, le=3600)      # the backlog asks for more this long before replicas are added
    # ... and for fewer this long before any is drained: longer, so a model load (seconds to minutes) is not repeated
    # on every dip in the traffic.
    down_delay_s: float = Field(60.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscale.min_replicas ({self.min_replicas}) must not exceed autoscale.max_replicas "
                             f"({self.max_replicas})")
        return self


class CacheSpec(BaseModel):
    """A deployment's response cache (broker/cache.py), for a model whose answer depends only on its request, and for
    a language model's greedy or seeded generations (gateway/generation.py): answers kept ttl_s, all of the model's
    together at most max_bytes (the oldest evicted first)."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(300.0, gt=0, le=7 * 86_400)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=1024**4)


class ModelSpec(BaseModel):
    """One deployment: which model, where it runs and how it batches."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$", max_length=64)
    # The Model class: "package.module:Class" or "path/to/file.py:Class"; default: the artifact manifest's runtime.
    model: str | None = Field(None, validation_alias=AliasChoices("model", "runtime"))
    task: str | None = None               # the task route bound to this deployment (TASKS), if any
    artifact: Path | None = None          # a store directory <store>/<name> or one version directory
    # The store version served (a directory name under the artifact); None: the newest. A rollout serves another one
    # beside it at run time (server/rollout.py); its workers get theirs with `inferline worker --version`.
    version: str | None = Field(None, pattern=VERSION_PATTERN, max_length=32)
    replicas: int = Field(1, ge=0, le=64)
    device: str = "cpu"
    max_batch_size: int | None = Field(None, ge=1, le=4096)        # None: the Model class's own default
    max_batch_delay_ms: float | None = Field(None, ge=0, le=10_000)
    queue_cap: int = Field(2048, ge=1, le=10_000_000)
    queue_cap_bytes: int = Field(128 * 1024 * 1024, ge=1024)   # payload bytes queued (counted exactly: enqueue.py)
    timeout_s: float = Field(30.0, gt=0, le=3600)
    threads: int = Field(1, ge=1, le=256)
    # A request pending this long on a live worker is claimed by another (the worker hung). A dead worker's requests
    # are claimed sooner, once its heartbeat lapses (~5-7 s). Keep it under timeout_s so a claimed request can still
    # be answered in time.
    visibility_timeout_s: float = Field(10.0, gt=0, le=3600)
    max_tries: int = Field(3, ge=1, le=100)                    # deliveries before the dead-letter stream
    # A model call (one batch's predict, one decoding step) still running this long is hung: its requests get 504
    # naming the model and this bound, and the worker exits (worker/watchdog.py EXIT_HUNG) to be replaced by its
    # supervisor or Kubernetes; the thread a hung call holds cannot be taken back any other way. Well above a real
    # batch (ms to seconds here, a first call's warm-up included) and at most an hour.
    predict_timeout_s: float = Field(30.0, ge=0.1, le=3600)
    options: dict[str, Any] = Field(default_factory=dict)      # runtime-specific knobs (e.g. a hub id for gpt2)
    autoscale: AutoscaleSpec = Field(default_factory=AutoscaleSpec)
    cache: CacheSpec | None = None        # None: no response cache (the default)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("must be cpu, cuda, cuda:N or auto")
        return value

    @field_validator("task")
    @classmethod
    def _task(cls, value: str | None) -> str | None:
        if value is not None and value not in TASKS:
            raise ValueError(f"must be one of {list(TASKS)}")
        return value


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    retry_after_s: int = Field(1, ge=1, le=3600)
    # Bounded cost per connection (server/gateway/connlimits.py). Headers beyond these: 431 and the connection closes.
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)   # request line + all headers
    max_headers: int = Field(100, ge=8, le=1000)
    header_timeout_s: float = Field(10.0, gt=0, le=300)    # from connection (or first byte) to the end of headers
    keep_alive_s: float = Field(5.0, gt=0, le=300)         # idle between requests on a kept-alive connection
    # Connections: all clients together, one client's share (by peer address: an IPv4 address or an IPv6 /64), and
    # how many of that share may be idle (no request in progress: new, mid-headers or kept alive). Over any: 503 and
    # closed (gateway/fairshare.py). Behind a proxy every client is the proxy: raise the share to max_connections.
    max_connections: int = Field(2048, ge=1, le=1_000_000)
    max_connections_per_client: int = Field(256, ge=1, le=1_000_000)
    max_idle_connections_per_client: int = Field(32, ge=1, le=1_000_000)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)     # from the end of the headers to the body's last byte: 408
    access_log: bool = True    # one line per request on the "inferline.access" logger (INFERLINE_LOG_FORMAT=json)
    # The access log's own file, rotated at access_log_max_bytes with access_log_backups old files kept (access.log.1
    # ...): ~190 bytes a request, so the defaults keep ~1.7 M requests. None: with the rest of the log, on stderr
    # (unrotated: a container's log driver rotates it). `inferline up` sets <state_dir>/logs/access.log.
    access_log_file: Path | None = None
    access_log_max_bytes: int = Field(64 * 1024 * 1024, ge=4096, le=1024**4)
    access_log_backups: int = Field(4, ge=1, le=100)
    tls_certfile: Path | None = None                       # both set: the gateway serves HTTPS only
    tls_keyfile: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("gateway.tls_certfile and gateway.tls_keyfile must be set together")
        return self

    @model_validator(mode="after")
    def _shares(self) -> GatewaySettings:
        # An idle share at least as large as the whole share, or a share as large as the total, lets one client's
        # silent connections shut everyone else out.
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(f"gateway.max_connections_per_client ({self.max_connections_per_client}) must not exceed "
                             f"gateway.max_connections ({self.max_connections})")
        if self.max_idle_connections_per_client > self.max_connections_per_client:
            raise ValueError(f"gateway.max_idle_connections_per_client ({self.max_idle_connections_per_client}) must "
                             f"not exceed gateway.max_connections_per_client ({self.max_connections_per_client})")
        return self


class SecuritySettings(BaseModel):
    """API keys and per-key limits (SECURITY.md). A key's own record may set its rate, burst and concurrency;
    these are the defaults for keys that do not."""

    model_config = ConfigDict(extra="forbid")

    # "auto": keys required unless the gateway binds a loopback address; "required"; "off" (no key checks).
    auth: Literal["auto", "required", "off"] = "auto"
    metrics_public: bool = True        # /metrics without a key (for a scraper on a private network); else admin
    rate_per_s: float = Field(50.0, ge=0, le=1e6)        # token refill per key; 0: no rate limit
    burst: int = Field(100, ge=1, le=10_000_000)         # bucket size: requests a key may send at once
    concurrency: int = Field(64, ge=0, le=1_000_000)     # requests in flight per key; 0: no cap
    concurrency_lease_s: float = Field(600.0, gt=0, le=86_400)   # a slot a dead gateway held lapses after this
    # The durable copy of the key records (server/auth/keyfile.py): `inferline up` sets it for the gateway of its
    # private Redis, which puts the records back when that Redis lost them. None: the Redis's own durability.
    keys_file: Path | None = None


class BrokerSettings(BaseModel):
    """How every process talks to Redis, and the private Redis of `inferline up`."""

    model_config = ConfigDict(extra="forbid")

    # Every Redis call fails after this long when Redis hangs: requests then get 503 instead of waiting. It must
    # outlast the longest blocking read (1 s).
    timeout_s: float = Field(2.0, gt=1.0, le=60)
    # `inferline up`'s private Redis: append-only file in <state_dir>/redis (fsync every second), so a restart of
    # Redis keeps queued requests, groups and API keys. Off: a restart starts empty and everything recreates itself.
    persist: bool = False
    # REDIS_URL names a node of a Redis Cluster (env INFERLINE_BROKER__CLUSTER=true): every process discovers the
    # slot map and sends each command to the node serving its key (broker/nodes.py). Keys are laid out for it
    # (broker/keys.py): a model's keys share one slot, models spread over the shards by name.
    cluster: bool = False
    # Durable enqueue: a request counts as accepted (the gateway waits for its answer) only once its enqueue reached
    # this many replicas: one WAIT per tick of enqueues, in the same round trip (broker/ticks.py). Fewer within
    # replica_ack_timeout_s: 503 with Retry-After, "not replicated" (the request may still run; workers answer a
    # twice-delivered entry once). 0: off, and a failover may lose the last accepted requests (Redis replicates
    # asynchronously). Needs a replica: on a Redis without one every request waits the timeout and gets 503.
    min_replicas_ack: int = Field(0, ge=0, le=16)
    replica_ack_timeout_s: float = Field(0.5, gt=0, le=30)

    @model_validator(mode="after")
    def _wait_within_timeout(self) -> BrokerSettings:
        # The WAIT's answer is read on a connection with timeout_s as its socket timeout: it must come well before.
        if self.replica_ack_timeout_s > self.timeout_s / 2:
            raise ValueError(f"broker.replica_ack_timeout_s ({self.replica_ack_timeout_s:g}) must be at most half of "
                             f"broker.timeout_s ({self.timeout_s:g})")
        return self

    @property
    def replica_ack_timeout_ms(self) -> int:
        return int(self.replica_ack_timeout_s * 1000)


class Settings(BaseSettings):
    """Everything a gateway, worker or supervisor needs. Build with Settings.load()."""

    model_config = SettingsConfigDict(env_prefix="INFERLINE_", env_nested_delimiter="__", extra="forbid",
                                      populate_by_name=True)

    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "INFERLINE_REDIS_URL", "redis_url"))
    model_store: Path = Path("model_store")
    state_dir: Path = Path(".inferline")   # the embedded Redis and logs of `inferline up`
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    # A worker touches this file every heartbeat, whether Redis answers or not: a container's liveness probe reads
    # its age (deploy/worker_healthcheck.py), so a Redis outage never restarts workers. None: no file.
    alive_file: Path | None = None
    models: dict[str, ModelSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _name_models(self) -> Settings:
        bound: dict[str, str] = {}
        for key, spec in self.models.items():
            if spec.name and spec.name != key:
                raise ValueError(f"models.{key}.name is {spec.name!r}; it must match its key or be left out")
            spec.name = key
            if spec.artifact is None:
                spec.artifact = self.model_store / key   # used only where it exists
            if spec.task is not None:
                if spec.task in bound:
                    raise ValueError(f"models.{key}.task: task {spec.task!r} is already bound to {bound[spec.task]}")
                bound[spec.task] = key
        return self

    def deployment_for(self, task: str) -> ModelSpec | None:
        """The deployment a task route is bound to, or None."""
        return next((spec for spec in self.models.values() if spec.task == task), None)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: Any) -> Settings:
        """Read the config file (argument, else INFERLINE_CONFIG, else ./inferline.toml if present) and the
        environment. Raises ConfigError naming the offending key."""
        if config is not None:
            os.environ["INFERLINE_CONFIG"] = str(config)
        path = _config_path()
        if path is not None and not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe(exc, source=str(path or "environment"))) from None
        except ValueError as exc:   # malformed TOML
            raise ConfigError(f"{path}: {exc}") from None


def _config_path() -> Path | None:
    explicit = os.environ.get("INFERLINE_CONFIG")
    if explicit:
        return Path(explicit)
    return Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).is_file() else None


def describe(exc: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, what is wrong, and the value given."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        given = "" if err["type"] == "missing" else f" (given {err.get('input')!r})"
        lines.append(f"{key}: {err['msg']}{given}")
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


def spec_from_env() -> ModelSpec | None:
    """A worker started by a supervisor or a test gets its spec as JSON in INFERLINE_MODEL_SPEC."""
    raw = os.environ.get("INFERLINE_MODEL_SPEC")
    if not raw:
        return None
    try:
        return ModelSpec.model_validate(json.loads(raw))
    except ValidationError as exc:
        raise ConfigError(describe(exc, source="INFERLINE_MODEL_SPEC")) from None
