"""Prometheus metrics of state directories (`prepl exporter`), its own
process like node_exporter: each scrape of /metrics asks every state
directory's server for its status over the control socket, with a
timeout, so a server that does not answer makes `prepl_up 0`, never a
hung scrape, and the exporter never blocks a server.

Names follow Prometheus conventions (`prepl_` prefix, `_total` counters,
`_seconds`, `_bytes`); every metric carries a `state_dir` label, link
metrics a `link` label too.  Counters come from the server's memory and
restart with it (Prometheus handles counter resets).
"""
import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import control
from .errors import PreplError
from .state import StateDir

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0


class Collector:
    def __init__(self, states, timeout=SCRAPE_TIMEOUT):
        self.states = [StateDir(s) for s in states]
        self.timeout = timeout

    def describe(self):
        return []          # metrics are only known at scrape time

    def collect(self):
        m = _Metrics()
        for sd in self.states:
            try:
                st = control.request(sd.control_socket, "status", timeout=self.timeout)
            except (PreplError, OSError, ValueError) as e:
                log.debug("%s does not answer: %s", sd, e)
                m.gauge("up", "1 if the state directory's server answered the scrape",
                        sd.path, 0)
                continue
            m.gauge("up", "1 if the state directory's server answered the scrape", sd.path, 1)
            _node(m, sd.path, st)
        return m.families()


class _Metrics:
    """Families by name, filled sample by sample."""

    def __init__(self):
        self._f = {}

    def _family(self, kind, name, doc, labels):
        if name not in self._f:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            self._f[name] = cls(f"prepl_{name}", doc, labels=["state_dir", *labels])
        return self._f[name]

    def gauge(self, name, doc, state_dir, value, **labels):
        self._family("gauge", name, doc, list(labels)).add_metric(
            [state_dir, *labels.values()], value)

    def counter(self, name, doc, state_dir, value, **labels):
        self._family("counter", name, doc, list(labels)).add_metric(
            [state_dir, *labels.values()], value)

    def families(self):
        return list(self._f.values())


def _node(m, sd, st):
    m.gauge("info", "what the node is (labels), always 1", sd, 1, role=st["role"],
            volume_uuid=st["volume_uuid"])
    m.gauge("generation", "the node's generation (it changes on failover)", sd,
            st["generation"])
    if st["role"] == "secondary":
        _secondary(m, sd, st)
    else:
        _primary(m, sd, st)


def _primary(m, sd, st):
    bs = st["block_size"]
    m.counter("volume_writes", "write, zero and trim requests served", sd, st["writes_total"])
    m.counter("activity_log_syncs", "activity-log writes made durable", sd,
              st["activity_log_syncs"])
    m.gauge("snapshots_active", "snappoints whose snapshot is valid", sd,
            sum(1 for sp in st["snappoints"] if sp["snapshot"] == "valid"))
    m.gauge("snapshot_copied_bytes", "bytes copied on write into the snapshots held now", sd,
            sum(sp["copied_blocks"] for sp in st["snappoints"]) * bs)
    m.gauge("open_interval_changed_bytes", "bytes written since the last snappoint", sd,
            st["open_interval"]["changed_blocks"] * bs)
    m.gauge("superseded", "1 if the replica was promoted (fail back)", sd,
            int(st["superseded"] is not None))
    m.gauge("read_only", "1 if export \"\" refuses writes", sd, int(st["read_only"]))
    m.gauge("damaged_intervals", "closed intervals whose maps fail their digest", sd,
            len(st["damaged_intervals"]))
    for name, ln in st["links"].items():
        c = ln["counters"]
        m.counter("link_cycles_applied", "cycles applied since the server started", sd,
                  c["cycles_applied"], link=name)
        m.counter("link_cycles_failed", "cycles that failed since the server started", sd,
                  c["cycles_failed"], link=name)
        m.counter("link_bytes_sent", "data bytes of the applied cycles", sd, c["bytes_sent"],
                  link=name)
        m.counter("link_zero_bytes_sent", "bytes of the applied cycles sent as zeroes", sd,
                  c["zero_bytes_sent"], link=name)
        if ln["rpo_seconds"] is not None:
            m.gauge("link_rpo_seconds", "age of the point in time the replica holds", sd,
                    ln["rpo_seconds"], link=name)
        last = (ln.get("last_cycle") or {}).get("applied_at")
        if last:
            m.gauge("link_last_success_timestamp_seconds", "when the last cycle applied", sd,
                    last, link=name)
        m.gauge("link_bytes_pending", "bytes changed since the replica's point in time", sd,
                ln["bytes_pending"], link=name)
        progress = ln.get("progress") or {}
        m.gauge("link_sync_progress_ratio", "how far the running transfer got (0..1)", sd,
                progress.get("percent", 0) / 100, link=name)
        m.gauge("link_agent_running", "1 if the link's agent runs", sd,
                int(ln["agent_running"]), link=name)


def _secondary(m, sd, st):
    a = st.get("applied")
    if a:
        m.gauge("replica_applied_interval", "the interval the replica holds", sd,
                a["target"]["seq"])
        if a["target"].get("time"):
            m.gauge("replica_applied_age_seconds", "age of the point in time the replica "
                    "holds", sd, time.time() - a["target"]["time"])
    m.gauge("replica_failback_pending", "1 while a failback's first interval is awaited", sd,
            int(st.get("failback") is not None))
    m.gauge("replica_staging", "1 while an interval is being staged or merged", sd,
            int(st.get("staging") is not None))


def serve(states, listen):
    """Serves /metrics on listen ("ADDR:PORT", "[V6ADDR]:PORT") until killed."""
    from prometheus_client import CollectorRegistry, start_http_server
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(states))
    addr, _, port = listen.rpartition(":")
    _, thread = start_http_server(int(port), addr=addr.strip("[]") or "0.0.0.0",
                                  registry=registry)
    log.warning("serving metrics of %s at http://%s/metrics", ", ".join(states), listen)
    thread.join()
