"""The hub's counters and gauges, rendered in the Prometheus text format."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = ["Metrics"]


@dataclass
class Metrics:
    """What ``GET /metrics`` reports. Gauges (and the bytes relayed, which each stream counts
    in the hub's :class:`~.ledger.StreamLedger`) are read from the hub when rendered."""

    initiations: collections.Counter[str] = field(default_factory=collections.Counter)
    streams_total: int = 0
    control_connections_total: int = 0
    resumes_total: int = 0
    connections_refused_total: int = 0
    http_errors: collections.Counter[int] = field(default_factory=collections.Counter)

    def render(
        self,
        *,
        devices_online: int,
        streams_open: int,
        streams_waiting: int,
        connections: int = 0,
        bytes_relayed: int = 0,
    ) -> str:
        """The Prometheus text exposition of every metric."""
        lines = [
            "# HELP devstream_devices_online Devices with a registered control channel.",
            "# TYPE devstream_devices_online gauge",
            f"devstream_devices_online {devices_online}",
            "# HELP devstream_streams_open Streams with both sides joined.",
            "# TYPE devstream_streams_open gauge",
            f"devstream_streams_open {streams_open}",
            "# HELP devstream_streams_waiting Accepted streams waiting for one or both sides.",
            "# TYPE devstream_streams_waiting gauge",
            f"devstream_streams_waiting {streams_waiting}",
            "# HELP devstream_streams_total Streams that were paired since the hub started.",
            "# TYPE devstream_streams_total counter",
            f"devstream_streams_total {self.streams_total}",
            "# HELP devstream_initiations_total Stream initiations by outcome.",
            "# TYPE devstream_initiations_total counter",
        ]
        for outcome in sorted(self.initiations):
            lines.append(
                f'devstream_initiations_total{{outcome="{outcome}"}} {self.initiations[outcome]}'
            )
        lines += [
            "# HELP devstream_relayed_bytes_total Payload bytes relayed between stream sides.",
            "# TYPE devstream_relayed_bytes_total counter",
            f"devstream_relayed_bytes_total {bytes_relayed}",
            "# HELP devstream_resumes_total devstream.v1 stream sides that resumed after a drop.",
            "# TYPE devstream_resumes_total counter",
            f"devstream_resumes_total {self.resumes_total}",
            "# HELP devstream_control_connections_total Device control channels opened.",
            "# TYPE devstream_control_connections_total counter",
            f"devstream_control_connections_total {self.control_connections_total}",
            "# HELP devstream_connections Connections the hub serves (see max_connections).",
            "# TYPE devstream_connections gauge",
            f"devstream_connections {connections}",
            "# HELP devstream_connections_refused_total Connections past max_connections, "
            "answered without being served or closed.",
            "# TYPE devstream_connections_refused_total counter",
            f"devstream_connections_refused_total {self.connections_refused_total}",
            "# HELP devstream_http_errors_total Requests answered with an error, by error code.",
            "# TYPE devstream_http_errors_total counter",
        ]
        for code in sorted(self.http_errors):
            lines.append(f'devstream_http_errors_total{{code="{code}"}} {self.http_errors[code]}')
        return "\n".join(lines) + "\n"
