"""The durable copy of the API key records of a Redis that `inferline up` / `inferline serve` started itself.

Why a file and not Redis persistence: the private Redis runs without persistence unless broker.persist is on, and
turning its append-only file on for the keys alone is not possible (persistence is all or nothing): it would also
write every request payload to disk, which broker.persist = false exists to avoid. So `inferline keys create|revoke`
write each change here *before* Redis (a revoked key can then never come back from this file), and the gateway
puts the records back when it finds its private Redis without any (security.py, `security.keys_file`).

The file, `<state_dir>/redis/api-keys.json` (in the owner-only Redis directory, itself mode 0600), holds exactly
what Redis holds: salted scrypt hashes, never a secret. A file that exists with records also says "this deployment
requires keys": it outlives any loss of Redis data. A user-run Redis (REDIS_URL) has no such file; its
durability is its own (SECURITY.md).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

FILE = "api-keys.json"


def location(state_dir: Path) -> Path:
    """Where `inferline up` keeps the file for the private Redis in state_dir/redis."""
    return state_dir / "redis" / FILE


def load(path: Path) -> dict[str, dict[str, str]]:
    """The records by key id; {} when there is no file. Raises ValueError for a file that is not ours."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    records = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(records, dict):
        raise ValueError(f"{path} is not an inferline key file")
    return {str(k): {str(f): str(v) for f, v in r.items()} for k, r in records.items() if isinstance(r, dict)}


def change(path: Path, key_id: str, fields: dict[str, str] | None) -> None:
    """Add or replace one record (fields), or remove it (None). Under an exclusive lock (two `inferline keys` at
    once), written to a temporary file, fsynced and renamed over the old one: a crash leaves the old or the new
    file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        records = load(path)
        if fields is None:
            records.pop(key_id, None)
        else:
            records[key_id] = fields
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": records}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        os.close(lock_fd)
