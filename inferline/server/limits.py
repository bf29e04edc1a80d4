"""How much one request may ask for: the one table of per-request caps, on every route and protocol.

The task routes' schemas (server/schemas/tasks.py) validate with these at the gateway; the worker applies the same
caps to what only it parses (Open Inference Protocol tensors, a model's own `rows`), so a request sent as v2 or to
`/v1/models/{name}/predict` is bounded exactly as the same request on a task route. Bytes are bounded separately
(`[gateway] max_body_bytes` per request, `queue_cap_bytes` per model queue).

| cap             | value   | bounds                                                                          |
|-----------------|---------|---------------------------------------------------------------------------------|
| MAX_ROWS        | 256     | rows of one request: `texts`, predict `rows`, a v2 request's batch dimension    |
| MAX_TEXT_CHARS  | 10,000  | characters of one text (a `text`, each of `texts`, a v2 BYTES element)          |
| MAX_SERIES      | 100,000 | numbers in one row's list or tensor (a `series`, a v2 row's slice)              |
| MAX_HORIZON     | 1,024   | steps of one forecast                                                           |
| MAX_WIRE_INT    | 2**63-1 | magnitude of any integer queued (Redis payloads are JSON with 64-bit integers)  |

Why these numbers: they are the task routes' caps since those were written (256 `texts`, 10,000 characters,
100,000 numbers), now shared so no route is looser. Without a row cap one v2 request of 200,000 one-character texts
(a 1 MB body) held the sentiment worker 12.4 s; at 256 rows the same model answers in milliseconds.
"""

from __future__ import annotations

MAX_ROWS = 256
MAX_TEXT_CHARS = 10_000
MAX_SERIES = 100_000
MAX_HORIZON = 1024
MAX_WIRE_INT = 2**63 - 1
