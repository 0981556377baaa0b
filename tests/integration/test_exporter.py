"""prepl exporter: /metrics over HTTP, parsed with prometheus_client's own
parser, against status --json of both roles; a server that is down is
`prepl_up 0` and the scrape does not hang."""
import json
import socket
import subprocess
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ENV, PREPL, REPO, prepl, served_pair, stop_process, wait_for

SIZE = 4 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    took = time.monotonic() - t0
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, s.labels.get("state_dir"), s.labels.get("link"))
            samples[key] = s.value
    return samples, took


def test_metrics_match_the_status(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    h = prim.connect()
    h.pwrite(b"a" * 8192, 0)
    h.flush()
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once")
    h.pwrite(b"b" * 4096, 65536)
    h.flush()
    port = free_port()
    exp = subprocess.Popen(PREPL + ["exporter", prim.state, sec.state, "--listen",
                                    f"127.0.0.1:{port}"], env=ENV, cwd=REPO,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _up(port), 30, "the exporter")
        got, _ = scrape(port)
        p, s = str(prim.state), str(sec.state)
        st = json.loads(prepl("status", prim.state, "--json").stdout)
        ln = st["links"]["default"]
        assert got[("prepl_up", p, None)] == 1 and got[("prepl_up", s, None)] == 1
        assert got[("prepl_volume_writes_total", p, None)] == st["writes_total"]
        assert got[("prepl_link_cycles_applied_total", p, "default")] == 1
        assert got[("prepl_link_bytes_sent_total", p, "default")] == \
            ln["last_cycle"]["bytes"] == 8192
        assert got[("prepl_link_bytes_pending", p, "default")] == ln["bytes_pending"] == 4096
        assert abs(got[("prepl_link_rpo_seconds", p, "default")] - ln["rpo_seconds"]) < 5
        assert got[("prepl_link_last_success_timestamp_seconds", p, "default")] == \
            ln["last_cycle"]["applied_at"]
        assert got[("prepl_snapshots_active", p, None)] == sum(
            sp["snapshot"] == "valid" for sp in st["snappoints"])
        assert got[("prepl_superseded", p, None)] == 0
        sst = json.loads(prepl("status", sec.state, "--json").stdout)
        assert got[("prepl_replica_applied_interval", s, None)] == \
            sst["applied"]["target"]["seq"]
        assert got[("prepl_generation", s, None)] == sst["generation"]
        # a server down: prepl_up 0 for it, the other one still reported
        sec.kill()
        got, took = scrape(port)
        assert got[("prepl_up", s, None)] == 0 and got[("prepl_up", p, None)] == 1
        assert ("prepl_replica_applied_interval", s, None) not in got
        assert took < 5
    finally:
        stop_process(exp)


def _up(port):
    try:
        return scrape(port)
    except OSError:
        return None
