"""`--metrics PORT`: the bridge's status as Prometheus metrics, on 127.0.0.1 only.

prometheus-client serves from its own thread; each scrape asks the event loop for a fresh
`Bridge.status()` (`trio.from_thread`), so the numbers are exact and nothing is shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Final
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._daemon import Bridge, BridgeStatus

__all__ = ["MetricsServer", "start_metrics"]

METRICS_HOST: Final = "127.0.0.1"


class _BridgeCollector(Collector):
    def __init__(self, bridge: Bridge, token: trio.lowlevel.TrioToken) -> None:
        self._bridge = bridge
        self._token = token

    def _status(self) -> BridgeStatus | None:
        try:
            return trio.from_thread.run_sync(self._bridge.status, trio_token=self._token)
        except trio.RunFinishedError:
            return None

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if status is None:
            return
        yield GaugeMetricFamily(
            "tvdnet_bridge_period",
            "The period whose updates are out (0 before the epoch or after the last).",
            value=status.period or 0,
        )
        yield GaugeMetricFamily(
            "tvdnet_bridge_keystore_period",
            "The period of the device keys in the keystore on disk.",
            value=status.keystore_period or 0,
        )
        complete = [u for u in status.key_updates if u.all_acked_after is not None and u.vms]
        if complete:
            yield GaugeMetricFamily(
                "tvdnet_bridge_key_update_seconds",
                "From the start of the newest period every connected VM acknowledged to the "
                "last of those acks.",
                value=complete[-1].all_acked_after,
            )
        yield CounterMetricFamily(
            "tvdnet_bridge_keystore_errors",
            "Keystore writes that failed (and were retried).",
            value=status.keystore_errors,
        )
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "connected": GaugeMetricFamily(
                "tvdnet_bridge_vm_connected", "1 if the VM's key channel is open.", labels=["vm"]
            ),
            "acked": GaugeMetricFamily(
                "tvdnet_bridge_vm_acked_period",
                "The newest period the VM acknowledged.",
                labels=["vm"],
            ),
            "lag": GaugeMetricFamily(
                "tvdnet_bridge_vm_lag_periods",
                "Periods the VM's acknowledged keys are behind the current period.",
                labels=["vm"],
            ),
            "resends": CounterMetricFamily(
                "tvdnet_bridge_vm_resends", "Updates sent again for want of an ack.", labels=["vm"]
            ),
            "latency": GaugeMetricFamily(
                "tvdnet_bridge_vm_ack_latency_seconds",
                "Seconds from the first send of the newest acknowledged update to its ack.",
                labels=["vm"],
            ),
            "stuck": CounterMetricFamily(
                "tvdnet_bridge_vm_stuck",
                "Connections dropped because a write did not complete in time.",
                labels=["vm"],
            ),
        }
        for vm in status.vms:
            families["connected"].add_metric([vm.vm], 1 if vm.connected else 0)
            families["acked"].add_metric([vm.vm], vm.acked)
            families["lag"].add_metric([vm.vm], vm.lag)
            families["resends"].add_metric([vm.vm], vm.resends)
            families["stuck"].add_metric([vm.vm], vm.stuck)
            if vm.last_latency is not None:
                families["latency"].add_metric([vm.vm], vm.last_latency)
        yield from families.values()


@dataclass(slots=True)
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics(bridge: Bridge, port: int) -> MetricsServer:
    """Serve /metrics on 127.0.0.1:`port` (0: any free port). Call from the event loop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BridgeCollector(bridge, trio.lowlevel.current_trio_token()))
    server, thread = start_http_server(port, addr=METRICS_HOST, registry=registry)
    return MetricsServer(server, thread)
