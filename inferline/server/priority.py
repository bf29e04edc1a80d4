"""A request's priority: its lane on the model's streams (broker/keys.PRIORITY_LANES, highest first), asked for with
the `x-priority` header (or, on the OpenAI generation routes, vLLM's `priority` body field) and clamped to the API
key's maximum. One spelling of the rules; the gateway's Edge, security layer, routes and dispatcher call these.

    effective = clamp(parse(header) or "normal", key.max_priority)
"""

from __future__ import annotations

from inferline.server.broker.keys import PRIORITIES
from inferline.server.errors import ValidationFailed

DEFAULT = "normal"
HEADER = "x-priority"


def parse(value: str, field: str = HEADER) -> str:
    """A priority as sent (case-insensitive, spaces stripped). Raises ValidationFailed naming the field."""
    wanted = value.strip().lower()
    if wanted not in PRIORITIES:
        raise ValidationFailed(f"{field} must be one of {', '.join(PRIORITIES)} (given {value[:32]!r})", field=field)
    return wanted


def from_body(value: int | str) -> str:
    """The `priority` body field: one of the names, or vLLM's integer (lower is served first, 0 the default): below
    0 is high, 0 normal, above 0 low. Raises ValidationFailed."""
    if isinstance(value, bool):
        raise ValidationFailed("priority must be an integer or one of high, normal, low", field="priority")
    if isinstance(value, int):
        return "high" if value < 0 else DEFAULT if value == 0 else "low"
    return parse(value, "priority")


def clamp(asked: str, maximum: str) -> str:
    """The lower of the priority asked for and the key's maximum."""
    return asked if PRIORITIES.index(asked) >= PRIORITIES.index(maximum) else maximum
