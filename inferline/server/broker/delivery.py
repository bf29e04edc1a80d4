"""What a worker's side of a model's request stream hands out: `Delivery`, one request as a worker received it
(`parse_entry` makes it from a stream entry), and the answer for one that is dead-lettered. consumer.py reads them,
sender.py answers and acknowledges them, claims.py takes them over from dead workers."""

from __future__ import annotations

from dataclasses import dataclass

from inferline.server.errors import DeadLettered
from inferline.server.protocol import PAYLOAD_FIELD, Envelope, Reply

OrphanPosition = tuple[int, bytes | None] | None   # (index of the stream in Lanes.by_lane, last id seen there)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request as a worker received it."""

    entry_id: bytes
    envelope: Envelope
    payload: bytes
    tries: int = 1
    lane: str = ""   # the version whose lane it came from ("": the model's common stream)
    priority: str = "normal"   # the priority lane (keys.PRIORITY_LANES) of that stream

    @property
    def request_id(self) -> str:
        return self.envelope.request_id

    @property
    def arrived_ms(self) -> int:
        """When the entry reached the stream: its id's time part, Redis's clock (epoch ms)."""
        return int(self.entry_id.split(b"-", 1)[0])


_PAYLOAD = PAYLOAD_FIELD.encode()


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes], tries: int, lane: str = "",
                priority: str = "normal") -> Delivery:
    """An entry as read (from the common stream, or the version `lane`'s; its `priority` lane). One without a payload
    (written by an older gateway, or by hand) gets an empty one, which fails to decode: that request alone is answered
    with an error and acknowledged, not retried."""
    return Delivery(entry_id, Envelope.from_fields(fields), fields.get(_PAYLOAD, b""), tries, lane, priority)


def dead_letter_reply(delivery: Delivery, reason: str) -> Reply:
    return Reply.error(delivery.request_id, DeadLettered(
        f"request {delivery.request_id} failed {delivery.tries - 1} times ({reason}) and was moved to the dead-letter "
        "stream"))
