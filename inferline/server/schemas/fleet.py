"""Request bodies of the fleet's admin API (rollouts, scaling), and the spelling of a version's name; the answers are
in schemas/responses.py with every other answer. Pydantic only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# A version's name is part of Redis key names (its request lane, broker/keys.py): no braces, colons or spaces.
VERSION_PATTERN = r"^[A-Za-z0-9_.-]+$"


class RolloutRequest(BaseModel):
    """Start serving `version` (a store version of the model) beside the current one, then move traffic to it."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN, max_length=32, description="the store version to roll out")
    canary_percent: int | None = Field(None, ge=1, le=100, description="send only this share of the requests to "
                                       "it until `promote` (default: all of them once its workers are live)")
    window_requests: int = Field(200, ge=1, le=1_000_000, description="the automatic rollback's window: the new "
                                 "version's first answers (or window_s, whichever ends first)")
    window_s: float = Field(60.0, gt=0, le=86_400, description="the window's length in seconds")
    max_failure_rate: float = Field(0.05, ge=0, le=1, description="the share of failed answers (5xx-type and dead "
                                    "letters, not client errors) in the window that rolls back by itself")
    load_timeout_s: float = Field(300.0, gt=0, le=86_400, description="roll back when the new version has no live "
                                  "worker within this long")


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(ge=0, le=64, description="workers wanted; 0: requests wait in the queue (until their "
                          "deadline or a replica is back)")
