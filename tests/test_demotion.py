"""Demotion while resyncing: the decision, the transitions' steps, the health
check's writes, the options and the keepalived lines (and keepalived accepts them)."""

import ipaddress
import os
import pathlib
import shutil
import subprocess

import pytest

from snat_sync import demotion
from snat_sync import failover
from snat_sync import health
from snat_sync import health_check
from snat_sync import manager
from snat_sync import namespace
from snat_sync import render
from snat_sync import reports
from snat_sync import statedir
from snat_sync.conntrackd import CacheStats
from snat_sync.errors import InvalidInput
from snat_sync.roles import Role
from snat_sync.router import NamespaceFacts

COMPLETE = health.Replica(100000, 100003, 3, None)
SHORT = health.Replica(40000, 100003, 60003, "resyncing, 40000 of 100003")
UNKNOWN = health.Replica(0, None, None, "no report from the primary's daemon")
# The repair's resync goes to the fake daemon as conntrackd's request.
DEMOTION_CONFIG = ("[failover]\ndemote_while_resyncing = true\n"
                   "demotion_weight = -60\ndemotion_timeout = 30\n"
                   "table_transfer = false\n")


# -- the decision ---------------------------------------------------------------


@pytest.mark.parametrize("role, replica, since, now, expected", [
    ("primary", SHORT, 100.0, 101.0, 0),      # a primary never demotes itself
    ("primary", UNKNOWN, None, 101.0, 0),
    ("backup", SHORT, 100.0, 101.0, 1),       # resyncing
    ("backup", UNKNOWN, 100.0, 101.0, 1),     # not known yet: demoted
    ("backup", None, 100.0, 101.0, 1),
    ("backup", COMPLETE, 100.0, 101.0, 0),    # complete
    ("backup", SHORT, 100.0, 129.9, 1),
    ("backup", SHORT, 100.0, 130.0, 0),       # timeout 30 s: given up
    ("backup", SHORT, None, 10**9, 1),        # no transition: no clock to run out
    ("fault", SHORT, 100.0, 101.0, 1),
    ("unknown", UNKNOWN, None, 101.0, 1),
])
def test_decide(role, replica, since, now, expected):
    assert demotion.decide(role, replica, since, now, 30.0) == expected


def test_the_file_reads_back_and_anything_else_reads_none(tmp_path):
    path = tmp_path / "demotion"
    assert demotion.read(path) is None
    demotion.write(path, demotion.DEMOTED)
    assert path.read_text() == "1\n" and demotion.read(path) == 1
    demotion.write(path, demotion.NOT_DEMOTED)
    assert demotion.read(path) == 0
    path.write_text("-5\n")
    assert demotion.read(path) is None


# -- the transitions -------------------------------------------------------------


@pytest.mark.parametrize("standby_mode", ["warm", "cold"])
def test_backup_demotes_first_and_primary_lifts_it_first(standby_mode):
    backup = failover.plan(Role.BACKUP, standby_mode, demote=True)
    primary = failover.plan(Role.PRIMARY, standby_mode, demote=True)
    assert backup == (failover.DEMOTE, *failover.plan(Role.BACKUP, standby_mode))
    assert primary == (failover.LIFT_DEMOTION,
                       *failover.plan(Role.PRIMARY, standby_mode))
    for role in (Role.FAULT, Role.STOP):
        assert failover.plan(role, standby_mode, demote=True) == failover.plan(
            role, standby_mode)
    assert failover.DEMOTE not in failover.plan(Role.BACKUP, standby_mode)


def test_the_demote_step_writes_the_file(router_files):
    class Daemon:
        files = router_files

    for step, value in ((failover.DEMOTE, 1), (failover.LIFT_DEMOTION, 0)):
        record = failover.run_step(step, Daemon(), None)
        assert record.ok, record
        assert demotion.read(router_files.demotion) == value


# -- the health check ------------------------------------------------------------


class FakeDaemon:
    def cache_stats(self, timeout=None):
        return CacheStats(internal_active=0, external_active=0,
                          internal_no_space=0, external_no_space=0)

    def stats(self, kind, timeout=None):
        return None

    def process(self):
        return object()

    def control(self, *arguments, timeout=None):
        pass  # a repair's resync request


@pytest.fixture
def backup_node(make_conf, write_config, spec, monkeypatch):
    conf = make_conf(write_config(DEMOTION_CONFIG))
    files = manager.router_files(conf, spec.router_id)
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.last_transition,
                        {"role": "backup", "outcome": "done", "arrived": 1000.0})
    counts = {"kernel": 0}
    clock = {"now": 1001.0}
    monkeypatch.setattr(manager, "daemon_for", lambda conf, spec, files: FakeDaemon())
    monkeypatch.setattr(namespace, "kernel_entry_count", lambda pid: counts["kernel"])
    monkeypatch.setattr(health_check.time, "time", lambda: clock["now"])
    return conf, files, counts, clock


def primary_report(kernel, at):
    return {"169.254.192.2": reports.PeerReport(
        "169.254.192.2", "primary", 900.0, kernel, 0, kernel, at, at, at, "warm")}


def test_the_check_demotes_a_resyncing_backup_until_complete(backup_node, spec):
    conf, files, counts, clock = backup_node
    state = health_check.HealthState()

    def check(peers):
        return health_check.check(conf, spec, files, 4242, peers, state, None)

    state = check({})  # the primary's table unknown: demoted
    assert demotion.read(files.demotion) == 1
    counts["kernel"] = 40000
    state = check(primary_report(100000, clock["now"]))
    assert demotion.read(files.demotion) == 1
    clock["now"] += 1
    counts["kernel"] = 99500  # within 1 %
    state = check(primary_report(100000, clock["now"]))
    assert demotion.read(files.demotion) == 0
    clock["now"] += 1
    counts["kernel"] = 10  # short again, within the timeout: demoted again
    state = check(primary_report(100000, clock["now"]))
    assert demotion.read(files.demotion) == 1
    clock["now"] = 1000.0 + conf.failover.demotion_timeout  # given up
    check(primary_report(100000, clock["now"]))
    assert demotion.read(files.demotion) == 0


def test_the_check_leaves_a_recorded_primary_alone(backup_node, spec):
    """The record may be from before a crash; the primary transition lifted
    the demotion itself."""
    conf, files, _counts, _clock = backup_node
    statedir.write_json(files.last_transition,
                        {"role": "primary", "outcome": "done", "arrived": 1000.0})
    demotion.write(files.demotion, demotion.DEMOTED)
    health_check.check(conf, spec, files, 4242, {}, health_check.HealthState(), None)
    assert demotion.read(files.demotion) == 1


def test_the_check_does_not_overwrite_a_newer_transition(backup_node, spec):
    conf, files, _counts, _clock = backup_node
    last = statedir.read_json(files.last_transition)
    statedir.write_json(files.last_transition,
                        {"role": "backup", "outcome": "done", "arrived": 1000.5})
    demotion.write(files.demotion, demotion.DEMOTED)
    observation = health_check.observe(conf, FakeDaemon(), 4242, "backup")
    complete = {"169.254.192.2": reports.PeerReport(
        "169.254.192.2", "primary", 900.0, 0, 0, 0, observation.at, observation.at,
        observation.at, "warm")}
    assert health_check.demotion_decision(conf, observation, complete, last) == 0
    health_check.update_demotion(conf, files, observation, complete, last)
    assert demotion.read(files.demotion) == 1


def test_the_check_writes_no_file_with_the_option_off(conf, spec, monkeypatch):
    files = manager.router_files(conf, spec.router_id)
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.last_transition,
                        {"role": "backup", "outcome": "done", "arrived": 1000.0})
    monkeypatch.setattr(manager, "daemon_for", lambda conf, spec, files: FakeDaemon())
    monkeypatch.setattr(namespace, "kernel_entry_count", lambda pid: 0)
    health_check.check(conf, spec, files, 4242, {}, health_check.HealthState(), None)
    assert not files.demotion.exists()


# -- options ---------------------------------------------------------------------


def test_defaults(conf):
    assert conf.failover.demote_while_resyncing is False
    assert conf.failover.demotion_weight == -100
    assert conf.failover.demotion_timeout == 300.0


@pytest.mark.parametrize("weight", ["0", "50", "-254"])
def test_a_weight_that_is_not_negative_or_too_low_is_refused(make_conf, write_config,
                                                             weight):
    path = write_config(f"[failover]\ndemotion_weight = {weight}\n")
    with pytest.raises(InvalidInput) as caught:
        make_conf(path)
    message = str(caught.value)
    assert "demotion_weight" in message and str(path) in message and weight in message
    if weight != "-254":
        assert "must be negative" in message and "FAULT" in message


# -- the keepalived lines --------------------------------------------------------


def test_the_snippet_has_the_track_file_only_with_the_option_on(
        make_conf, write_config, conf, spec, state_path):
    files = statedir.RouterFiles.under(state_path, spec.router_id)
    off = render.render_keepalived_snippet(
        spec, str(files.notify_hook), render.demotion_track_file(spec, files,
                                                                 conf.failover))
    assert "track_file" not in off
    on_conf = make_conf(write_config(DEMOTION_CONFIG))
    snippet = render.render_keepalived_snippet(
        spec, str(files.notify_hook),
        render.demotion_track_file(spec, files, on_conf.failover))
    assert (f"track_file snat_sync_r1 {{\n    file \"{files.demotion}\"\n"
            "    weight -60\n    init_file 1 overwrite\n}\n") in snippet
    instance = snippet[snippet.index("vrrp_instance"):]
    assert "    track_file {\n        snat_sync_r1\n    }\n" in instance
    assert snippet.count("{") == snippet.count("}")


def _interface():
    names = sorted(os.listdir("/sys/class/net")) if os.path.isdir(
        "/sys/class/net") else []
    return next((name for name in names if name != "lo"), None)


@pytest.mark.skipif(shutil.which("keepalived") is None or _interface() is None,
                    reason="keepalived or a network interface is missing")
def test_keepalived_accepts_a_full_config_with_the_snippet(
        make_conf, write_config, spec, state_path, tmp_path):
    """`keepalived --config-test` on an instance with the snippet's lines; and it
    does refuse a misspelt one (the test has teeth)."""
    files = statedir.RouterFiles.under(state_path, spec.router_id)
    on_conf = make_conf(write_config(DEMOTION_CONFIG))
    snippet = render.render_keepalived_snippet(
        spec, str(files.notify_hook),
        render.demotion_track_file(spec, files, on_conf.failover))
    instance_settings = (
        "    state BACKUP\n"
        f"    interface {_interface()}\n"
        "    virtual_router_id 7\n"
        "    priority 200\n"
        "    advert_int 1\n"
        "    virtual_ipaddress {\n        192.0.2.77/32\n    }\n")
    config = snippet.replace("    # ... the instance's own settings, with "
                             "virtual_router_id 7 ...\n", instance_settings)
    assert config != snippet

    def config_test(text):
        path = tmp_path / "keepalived.conf"
        path.write_text(text)
        return subprocess.run(["keepalived", "--config-test", "-f", str(path)],
                              capture_output=True, text=True, timeout=20)

    accepted = config_test(config)
    assert accepted.returncode == 0, (accepted.stderr, config)
    refused = config_test(config.replace("weight -60", "wieght -60"))
    assert refused.returncode != 0, refused.stderr


def test_router_add_prints_the_track_file_lines(make_conf, write_config, spec,
                                                state_path, monkeypatch):
    """generate (what `router add` prints and --json returns) carries them."""
    conf = make_conf(write_config(DEMOTION_CONFIG))
    files = manager.router_files(conf, spec.router_id)
    facts = NamespaceFacts(ipaddress.ip_network("169.254.192.0/18"), 262144)
    rendered = manager.generate(conf, spec, facts, files, ["snat-sync"])
    assert f'file "{files.demotion}"' in rendered.keepalived_snippet
    assert "weight -60" in rendered.keepalived_snippet
    assert pathlib.Path(str(files.demotion)).name == "demotion"
