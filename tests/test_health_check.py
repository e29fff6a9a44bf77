"""The daemon's health check: a report every check, even while conntrackd is busy;
health.json rewritten while the figures move, only confirmed while they rest."""

import json
import os

import pytest

from snat_sync import health
from snat_sync import health_check
from snat_sync import manager
from snat_sync import namespace
from snat_sync import reports
from snat_sync import statedir
from snat_sync.conntrackd import CacheStats
from snat_sync.router import RouterSpec


class FakeDaemon:
    def __init__(self, busy=False):
        self.busy = busy
        self.timeouts = []

    def cache_stats(self, timeout=None):
        self.timeouts.append(timeout)
        if self.busy:
            return None
        return CacheStats(internal_active=200000, external_active=0,
                          internal_no_space=0, external_no_space=0)

    def stats(self, kind, timeout=None):
        self.timeouts.append(timeout)
        return None

    def process(self):
        return object()


class FakeChannel:
    def __init__(self):
        self.sent = []

    def send(self, payload):
        self.sent.append(json.loads(payload))


@pytest.fixture
def router(conf, spec, monkeypatch):
    files = manager.router_files(conf, spec.router_id)
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.last_transition,
                        {"role": "primary", "outcome": "done", "arrived": 100.0})
    daemon = FakeDaemon()
    counts = {"kernel": 200012}
    monkeypatch.setattr(manager, "daemon_for", lambda conf, spec, files: daemon)
    monkeypatch.setattr(namespace, "kernel_entry_count", lambda pid: counts["kernel"])
    return files, daemon, counts


def test_a_busy_conntrackd_still_gets_a_report_out_with_the_kernel_count(
        conf, spec, router):
    files, daemon, _counts = router
    daemon.busy = True
    channel = FakeChannel()
    health_check.check(conf, spec, files, 4242, {}, health_check.HealthState(),
                       channel)
    (sent,) = channel.sent
    assert (sent["v"], sent["kernel"], sent["internal"], sent["external"]) == (
        2, 200012, None, None)
    assert sent["taken"] <= sent["sent"]
    assert sent["standby"] == conf.failover.standby_mode
    # it waited a short while for conntrackd, not the control timeout
    assert daemon.timeouts == [health_check.STATS_TIMEOUT]


def test_health_json_is_rewritten_while_the_figures_move_and_confirmed_at_rest(
        conf, spec, router, monkeypatch):
    files, _daemon, counts = router
    clock = {"now": 1000.0}
    monkeypatch.setattr(health_check.time, "time", lambda: clock["now"])
    state = health_check.check(conf, spec, files, 4242, {},
                               health_check.HealthState(), None)
    assert json.loads(files.health.read_text())["checked"] == 1000.0
    os.utime(files.health, (1.0, 1.0))

    clock["now"] = 1003.0  # nothing moved: only confirmed (mtime now)
    state = health_check.check(conf, spec, files, 4242, {}, state, None)
    assert json.loads(files.health.read_text())["checked"] == 1000.0
    assert files.health.stat().st_mtime > 1.0

    clock["now"] = 1006.0  # the table grew by more than the tolerance: rewritten
    counts["kernel"] = 300000
    state = health_check.check(conf, spec, files, 4242, {}, state, None)
    data = json.loads(files.health.read_text())
    assert data["checked"] == 1006.0
    assert data["check_interval"] == conf.health.check_interval
    report = health.parse_report(data, confirmed=files.health.stat().st_mtime)
    assert report.check_interval == conf.health.check_interval
    # the table the peers' figures in it go with
    assert data["table"] == 300000 and report.table == 300000


def test_a_peer_whose_report_goes_stale_rewrites_health_json(conf, spec, router,
                                                            monkeypatch):
    files, _daemon, _counts = router
    clock = {"now": 1000.0}
    monkeypatch.setattr(health_check.time, "time", lambda: clock["now"])
    peer = reports.PeerReport("169.254.192.2", "backup", None, 3, 0, 200000, 999.0,
                              999.5, 999.0, "warm")
    state = health_check.check(conf, spec, files, 4242, {"169.254.192.2": peer},
                               health_check.HealthState(), None)
    written = json.loads(files.health.read_text())
    assert written["peers"][0]["figures_age"] == 0.0
    assert written["peers"][0]["standby"] == "warm"
    clock["now"] = 1000.5 + health.REPORT_FRESH_CHECKS * conf.health.check_interval
    health_check.check(conf, spec, files, 4242, {"169.254.192.2": peer}, state, None)
    assert json.loads(files.health.read_text())["checked"] == clock["now"]


@pytest.mark.parametrize("before, after, moved", [
    (((100, 100, 0),), ((110, 100, 0),), False),        # within 16 entries
    (((100000, 1, 0),), ((101000, 1, 0),), False),      # within 1 %
    (((100000, 1, 0),), ((102000, 1, 0),), True),
    (((100, None, 0),), ((100, 5, 0),), True),          # conntrackd answered again
    (((1, 1, 1), ("a", 1, 1, 1)), ((1, 1, 1),), True),  # a peer came or went
])
def test_figures_moved(before, after, moved):
    assert health_check.figures_moved(before, after, 1.0) is moved


def test_a_router_without_peers_counts_the_learned_ones_and_forgets_the_long_silent(
        conf, router, monkeypatch):
    """Neutron: no peer list. A learned peer silent past peer_timeout is a silent
    peer (degraded) like a listed one; after FORGET_AFTER_TIMEOUTS it is gone."""
    files, _daemon, _counts = router
    spec = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                             [], 7, "169.254.0.7/24")
    clock = {"now": 1000.0}
    monkeypatch.setattr(health_check.time, "time", lambda: clock["now"])
    backup = reports.PeerReport("169.254.192.2", "backup", None, 3, 0, 200010,
                                999.0, 999.5, 999.0, "warm")
    state = health_check.check(conf, spec, files, 4242, {"169.254.192.2": backup},
                               health_check.HealthState(), FakeChannel())
    written = json.loads(files.health.read_text())
    assert [peer["address"] for peer in written["peers"]] == ["169.254.192.2"]
    assert written["problems"] == []

    clock["now"] = 999.5 + conf.health.peer_timeout + 1
    state = health_check.check(conf, spec, files, 4242, {"169.254.192.2": backup},
                               state, FakeChannel())
    written = json.loads(files.health.read_text())
    assert [problem["kind"] for problem in written["problems"]] == ["peer-silent"]

    clock["now"] = 999.5 + reports.FORGET_AFTER_TIMEOUTS * conf.health.peer_timeout + 1
    health_check.check(conf, spec, files, 4242, {"169.254.192.2": backup}, state,
                       FakeChannel())
    written = json.loads(files.health.read_text())
    assert (written["peers"], written["problems"]) == ([], [])
