"""Request ids: unique across processes and machines, and cheap (uuid4 per request showed in profiles).
A random 48-bit prefix per process plus a counter."""

from __future__ import annotations

import itertools
import secrets

_PREFIX = secrets.token_hex(6)
_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):08x}"
