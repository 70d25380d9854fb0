"""What the hub records of each stream for its operator: who, what, how many bytes each way,
and how it ended; the ``stream … ended`` log line and ``GET /streams`` read it.

The relays count bytes into a stream's two :class:`Flow` objects where they counted them for
``/metrics`` before (one addition per batch of messages forwarded, as then): nothing more is
done per message. A stream's end is noted by whoever sees it first (a side's close, a drop,
the bridge's timer); the line is written once the bridge says the stream is over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from devstream_core.common import Role

__all__ = ["END_CLOSED", "END_RESET", "END_TIMEOUT", "END_VANISHED", "Flow", "StreamLedger"]

log = logging.getLogger("devstream.hub")

#: A side closed the stream normally (WebSocket close 1000, 1001 or 1005).
END_CLOSED = "closed"
#: A side closed it with an error code, or the hub ended it (a device disabled or deleted).
END_RESET = "reset"
#: A side never came: the stream tokens expired (504901).
END_TIMEOUT = "timeout"
#: A side's connection ended without a close, and (devstream.v1) it did not come back within
#: the grace period.
END_VANISHED = "vanished"

#: WebSocket close codes of a normal end.
_NORMAL_CLOSES = frozenset({1000, 1001, 1005})
#: The close code of a connection lost without a close.
_ABNORMAL = 1006


@dataclass(slots=True)
class Flow:
    """The payload bytes relayed one way on a stream."""

    count: int = 0


@dataclass(slots=True, eq=False)
class StreamRecord:
    """One stream the hub knows, from its initiation (or first join) to its end."""

    stream_id: str
    device_id: str
    #: The stream name the service asked for ("" when the hub did not see the initiation).
    name: str
    mode: str
    #: When the stream was created, on the hub's timer clock.
    created_at: float
    to_device: Flow = field(default_factory=Flow)
    to_service: Flow = field(default_factory=Flow)
    #: How it ended (``END_*``), by whom (``device``, ``service`` or ``hub``), with which code
    #: (a WebSocket close code, or the hub's error code); set by the first to notice.
    end: str | None = None
    by: str | None = None
    code: int | None = None
    #: Both sides have joined.
    paired: bool = False
    #: The role of the last side held for a resume (devstream.v1), if any.
    held: Role | None = None

    def toward(self, role: Role) -> Flow:
        """The flow of bytes sent to side *role*."""
        return self.to_device if role is Role.DEVICE else self.to_service

    def note_end(self, end: str, by: str, code: int) -> None:
        """How the stream ends, unless that was noted already."""
        if self.end is None:
            self.end, self.by, self.code = end, by, code

    def note_close(self, role: Role, code: int) -> None:
        """Side *role*'s connection ended with WebSocket close *code* (1006: without one)."""
        if code == _ABNORMAL:
            self.note_end(END_VANISHED, role.value, code)
        elif code in _NORMAL_CLOSES:
            self.note_end(END_CLOSED, role.value, code)
        else:
            self.note_end(END_RESET, role.value, code)


class StreamLedger:
    """The live streams of one hub, and the bytes of those that ended."""

    def __init__(self) -> None:
        self.records: dict[str, StreamRecord] = {}
        #: Payload bytes relayed by streams that ended.
        self.bytes_ended = 0

    def open(
        self, *, stream_id: str, device_id: str, name: str, mode: str, now: float
    ) -> StreamRecord:
        """Stream *stream_id* was created by an initiation."""
        record = StreamRecord(
            stream_id=stream_id, device_id=device_id, name=name, mode=mode, created_at=now
        )
        self.records[stream_id] = record
        return record

    def get(self, stream_id: str, *, device_id: str, mode: str, now: float) -> StreamRecord:
        """The record of *stream_id*, made now if the hub did not see its initiation."""
        record = self.records.get(stream_id)
        if record is None:
            record = self.open(
                stream_id=stream_id, device_id=device_id, name="", mode=mode, now=now
            )
        return record

    def forget(self, stream_id: str) -> None:
        """Stream *stream_id* never was one (its initiation was refused or failed)."""
        self.records.pop(stream_id, None)

    def bytes_relayed(self) -> int:
        """Payload bytes relayed since the hub started, by streams live and ended."""
        return self.bytes_ended + sum(
            r.to_device.count + r.to_service.count for r in self.records.values()
        )

    def finish(self, stream_id: str, now: float) -> None:
        """Stream *stream_id* is over: write its line and forget it (once)."""
        record = self.records.pop(stream_id, None)
        if record is None:
            return
        to_device, to_service = record.to_device.count, record.to_service.count
        self.bytes_ended += to_device + to_service
        if not log.isEnabledFor(logging.INFO):
            return
        end = record.end or END_CLOSED
        by = record.by or "hub"
        code = record.code
        duration = max(0.0, now - record.created_at)
        how = {
            END_CLOSED: f"closed by the {by}",
            END_RESET: f"reset by the {by}",
            END_TIMEOUT: "timed out waiting for a side",
            END_VANISHED: f"the {by} vanished",
        }[end]
        log.info(
            "stream %s ended, %s%s: device %r, name %r, %s, %d bytes to the device, "
            "%d bytes to the service, %.3f s",
            record.stream_id,
            how,
            "" if code is None else f" (code {code})",
            record.device_id,
            record.name,
            record.mode,
            to_device,
            to_service,
            duration,
            extra={
                "event": "stream_ended",
                "stream_id": record.stream_id,
                "device_id": record.device_id,
                "stream_name": record.name,
                "mode": record.mode,
                "end": end,
                "by": by,
                "code": code,
                "bytes_to_device": to_device,
                "bytes_to_service": to_service,
                "duration": round(duration, 3),
            },
        )
