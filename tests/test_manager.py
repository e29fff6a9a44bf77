"""The node manager with the system faked out: what `router add` writes, what it
undoes when starting conntrackd fails, and `router remove`."""

import dataclasses
import difflib
import ipaddress
import json
import os
import stat
import time

import pytest

from snat_sync import conntrackd
from snat_sync import manager
from snat_sync import render
from snat_sync import statedir
from snat_sync import tcp_tracking
from snat_sync.conntrackd import ConntrackdError
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.guard import GuardError
from snat_sync.roles import Role
from snat_sync.router import NamespaceFacts, RouterSpec

FACTS = NamespaceFacts(ipaddress.ip_network("169.254.192.0/18"), 262144)
COMMAND = ["/usr/bin/python3", "-m", "snat_sync", "--state-path", "/state"]

LIBERAL = {tcp_tracking.BE_LIBERAL: "1"}


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


class FakeSystem:
    """Namespace facts and a conntrackd that only record what they are asked."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.start_error = None
        self.foreign = []
        self.running = False
        self.namespaces = {"qrouter-r1", "qrouter-r1-new"}
        self.guard_error = None
        monkeypatch.setattr(manager.namespace, "gather_facts", lambda spec: FACTS)
        monkeypatch.setattr(manager.namespace, "namespace_inode",
                            lambda name: 4026532000 if name in self.namespaces
                            else None)
        monkeypatch.setattr(manager.guard, "lift_guard", self.lift_guard)
        monkeypatch.setattr(manager.guard, "raise_guard", self.raise_guard)
        monkeypatch.setattr(manager.refresh, "apply", lambda namespace, files:
                            self.calls.append(("apply-refresh", namespace)))
        monkeypatch.setattr(manager.refresh, "remove", lambda namespace:
                            self.calls.append(("remove-refresh", namespace)))
        monkeypatch.setattr(manager.tcp_tracking, "apply", lambda namespace, sysctls:
                            self.calls.append(("sysctl", namespace, sysctls)))
        monkeypatch.setattr(manager.conntrackd, "foreign_daemons",
                            lambda namespace, config: self.foreign)
        monkeypatch.setattr(manager.conntrackd, "daemons_with_config",
                            lambda config: [])
        fake = self  # plain functions: they become methods of Conntrackd

        def start(daemon, scheduler_policy="other"):
            return fake.start(daemon, scheduler_policy)

        def stop(daemon):
            return fake.stop(daemon)

        monkeypatch.setattr(conntrackd.Conntrackd, "start", start)
        monkeypatch.setattr(conntrackd.Conntrackd, "stop", stop)
        monkeypatch.setattr(conntrackd.Conntrackd, "process", lambda daemon: None)

    def start(self, daemon, scheduler_policy="other"):
        self.calls.append(("start", daemon.namespace, scheduler_policy))
        if self.start_error:
            raise self.start_error
        started = not self.running
        self.running = True
        return started

    def stop(self, daemon):
        self.calls.append(("stop", daemon.namespace))
        self.running = False
        return True

    def lift_guard(self, namespace, files):
        self.calls.append(("lift-guard", namespace, files.guard_lift))
        if self.guard_error:
            raise self.guard_error

    def raise_guard(self, namespace, files):
        self.calls.append(("raise-guard", namespace, files.guard_raise))


@pytest.fixture
def system(monkeypatch):
    return FakeSystem(monkeypatch)


def test_generate_is_pure_and_complete(cold_conf, spec, state_path):
    conf = cold_conf
    files = manager.router_files(conf, "r1")
    rendered = manager.generate(conf, spec, FACTS, files, COMMAND)
    contents = rendered.contents()
    assert list(contents) == [files.spec, files.conntrackd_variant(Role.PRIMARY),
                              files.conntrackd_variant(Role.BACKUP),
                              files.conntrackd_config, files.guard_raise,
                              files.guard_lift, files.refresh_rules, files.notify_hook]
    assert [each[1] for each in contents.values()] == [0o600] * 7 + [0o700]
    # Cold standby: a backup's conntrackd injects nothing, both read events.
    assert rendered.backup_conntrackd_config == rendered.conntrackd_config
    assert RouterSpec.from_dict(json.loads(contents[files.spec][0])) == spec
    assert "Port 3787" in rendered.conntrackd_config
    assert contents[files.guard_raise][0] == rendered.guard_raise
    assert contents[files.guard_lift][0] == rendered.guard_lift
    assert (rendered.guard_raise, rendered.guard_lift) == render.render_guard(
        spec, manager.guard.TABLE)
    assert '"ha-1a2b3c4d-5e"' in rendered.guard_raise
    assert (f"nsenter --net=/run/netns/qrouter-r1 nft -f {files.guard_lift}"
            in rendered.notify_hook)
    assert rendered.notify_command == str(files.notify_hook)
    assert not state_path.exists()


def test_generate_for_warm_standby_injects_refreshes_and_commits_nothing(conf, spec):
    files = manager.router_files(conf, "r1")
    rendered = manager.generate(conf, spec, FACTS, files, COMMAND)
    assert "DisableExternalCache On" in rendered.backup_conntrackd_config
    assert "DisableExternalCache Off" in rendered.conntrackd_config  # the primary's
    assert rendered.refresh_rules == render.render_refresh(
        spec, manager.refresh.TABLE, render.RefreshSettings(4, 8))
    assert "ct mark set" in rendered.refresh_rules
    assert " -c " not in rendered.notify_hook and "nft" not in rendered.notify_hook


def test_generate_for_cold_standby_removes_the_refreshes(cold_conf, spec):
    rendered = manager.generate(cold_conf, spec, FACTS,
                                manager.router_files(cold_conf, "r1"), COMMAND)
    assert "DisableExternalCache Off" in rendered.conntrackd_config
    assert "delete table inet snat_sync_refresh" in rendered.refresh_rules
    assert "ct mark" not in rendered.refresh_rules


def test_generate_without_guard_renders_a_hook_that_never_lifts_it(
        make_conf, write_config, spec):
    conf = make_conf(write_config("[failover]\nreset_window_guard = false\n"))
    files = manager.router_files(conf, "r1")
    rendered = manager.generate(conf, spec, FACTS, files, COMMAND)
    assert "nsenter" not in rendered.notify_hook
    assert "nft" not in rendered.notify_hook


def test_router_files_checks_the_router_id_and_the_state_path(conf, make_conf,
                                                              tmp_path):
    with pytest.raises(InvalidInput, match="router id"):
        manager.router_files(conf, "../r1")
    conf = make_conf(extra=["--state-path", str(tmp_path / "a;b")])
    with pytest.raises(InvalidInput, match="state path"):
        manager.router_files(conf, "r1")


def test_add_writes_the_files_and_starts_conntrackd(cold_conf, spec, system):
    conf = cold_conf
    result = manager.add_router(conf, spec, COMMAND)
    files = result.rendered.files
    assert mode(files.directory) == 0o700
    assert mode(files.spec) == 0o600
    assert mode(files.conntrackd_config) == 0o600
    assert mode(files.guard_raise) == 0o600
    assert mode(files.guard_lift) == 0o600
    assert mode(files.notify_hook) == 0o700
    assert files.conntrackd_config.read_text() == result.rendered.conntrackd_config
    assert files.guard_raise.read_text() == result.rendered.guard_raise
    assert files.guard_lift.read_text() == result.rendered.guard_lift
    assert files.notify_hook.read_text() == result.rendered.notify_hook
    assert files.refresh_rules.read_text() == result.rendered.refresh_rules
    assert result.changed_files == (files.spec, files.conntrackd_variant(Role.PRIMARY),
                                    files.conntrackd_variant(Role.BACKUP),
                                    files.conntrackd_config,
                                    files.guard_raise, files.guard_lift,
                                    files.refresh_rules, files.notify_hook)
    assert result.conntrackd_started is True
    assert system.calls == [("start", "qrouter-r1", "other"),
                            ("apply-refresh", "qrouter-r1"),
                            ("sysctl", "qrouter-r1", LIBERAL)]


def test_warm_backups_read_conntrack_events_only_when_told_to(
        conf, events_reading_backup_conf, spec):
    default = manager.generate(conf, spec, FACTS, manager.router_files(conf, "r1"),
                               COMMAND)
    assert default.backup_conntrackd_config != default.conntrackd_config
    told = manager.generate(events_reading_backup_conf, spec, FACTS,
                            manager.router_files(events_reading_backup_conf, "r1"),
                            COMMAND)
    assert told.backup_conntrackd_config == told.conntrackd_config


def test_generate_for_warm_standby_gives_the_backup_a_conntrackd_that_reads_no_events(
        conf, spec):
    files = manager.router_files(conf, "r1")
    rendered = manager.generate(conf, spec, FACTS, files, COMMAND)
    primary = rendered.conntrackd_config
    backup = rendered.backup_conntrackd_config
    assert "\t\t\tTCP\n" in primary and "ipv6-nonxt" not in primary
    assert "\t\t\tipv6-nonxt\n" in backup and "\t\t\tTCP\n" not in backup
    differing = [line for line in difflib.ndiff(primary.splitlines(),
                                                backup.splitlines())
                 if line[:1] in "+-"]
    assert all("Accept" not in line and "Address" not in line
               for line in differing), differing


def test_a_new_warm_router_runs_the_primarys_configuration(conf, spec, system):
    """It reads conntrack events as any conntrackd does, so the router replicates
    before any transition; keepalived's first BACKUP gives a backup its own."""
    result = manager.add_router(conf, spec, COMMAND)
    files = result.rendered.files
    assert (files.conntrackd_config.read_text()
            == files.conntrackd_variant(Role.PRIMARY).read_text()
            == result.rendered.conntrackd_config)
    assert (files.conntrackd_variant(Role.BACKUP).read_text()
            == result.rendered.backup_conntrackd_config)


def test_add_again_keeps_a_backup_running_the_backups_configuration(
        conf, spec, system):
    files = manager.add_router(conf, spec, COMMAND).rendered.files
    files.conntrackd_config.write_text(
        files.conntrackd_variant(Role.BACKUP).read_text())
    result = manager.add_router(conf, spec, COMMAND)
    assert result.changed_files == ()
    assert ("stop", "qrouter-r1") not in system.calls
    moved = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e",
                              "169.254.192.1", ["169.254.192.2"], 9)
    result = manager.add_router(conf, moved, COMMAND)
    assert "Port 3789" in files.conntrackd_config.read_text()
    assert (files.conntrackd_config.read_text()
            == files.conntrackd_variant(Role.BACKUP).read_text())


def test_status_names_the_configuration_conntrackd_runs(conf, cold_conf, spec, system):
    files = manager.add_router(conf, spec, COMMAND).rendered.files
    assert manager.configuration_running(files) == "primary"
    files.conntrackd_config.write_text(
        files.conntrackd_variant(Role.BACKUP).read_text())
    assert manager.configuration_running(files) == "backup"
    manager.add_router(cold_conf, spec, COMMAND)
    assert manager.configuration_running(files) is None  # the two are the same


def test_add_again_with_the_same_arguments_changes_nothing(conf, spec, system):
    manager.add_router(conf, spec, COMMAND)
    files = manager.router_files(conf, "r1")
    before = {path: path.stat().st_mtime_ns for path in files.directory.iterdir()}
    result = manager.add_router(conf, spec, COMMAND)
    assert result.changed_files == ()
    assert result.conntrackd_started is False
    assert {path: path.stat().st_mtime_ns
            for path in files.directory.iterdir()} == before
    assert ("stop", "qrouter-r1") not in system.calls


def test_add_with_other_arguments_restarts_with_the_new_config(cold_conf, spec, system):
    conf = cold_conf
    manager.add_router(conf, spec, COMMAND)
    moved = RouterSpec.create("r1", "qrouter-r1-new", "ha-1a2b3c4d-5e",
                              "169.254.192.1", ["169.254.192.2"], 9)
    result = manager.add_router(conf, moved, COMMAND)
    assert system.calls == [("start", "qrouter-r1", "other"),
                            ("apply-refresh", "qrouter-r1"),
                            ("sysctl", "qrouter-r1", LIBERAL),
                            ("stop", "qrouter-r1"),
                            ("start", "qrouter-r1-new", "other"),
                            ("apply-refresh", "qrouter-r1-new"),
                            ("sysctl", "qrouter-r1-new", LIBERAL)]
    assert "Port 3789" in result.rendered.files.conntrackd_config.read_text()


def test_a_new_router_whose_conntrackd_fails_leaves_nothing(conf, spec, system):
    system.start_error = ConntrackdError("conntrackd for r1 failed to start")
    with pytest.raises(ConntrackdError):
        manager.add_router(conf, spec, COMMAND)
    assert not manager.router_files(conf, "r1").directory.exists()


def test_a_failed_reconcile_restores_the_previous_router(cold_conf, spec, system):
    conf = cold_conf
    manager.add_router(conf, spec, COMMAND)
    files = manager.router_files(conf, "r1")
    previous = {path: path.read_text() for path in
                (files.spec, files.conntrackd_config, files.guard_raise,
                 files.guard_lift, files.notify_hook)}
    # another HA interface: every file changes, the guard rulesets included
    other = RouterSpec.create("r1", "qrouter-r1", "ha-99999999-00", "169.254.192.1",
                              ["169.254.192.3"], 7)
    system.start_error = ConntrackdError("boom")
    with pytest.raises(ConntrackdError):
        manager.add_router(conf, other, COMMAND)
    assert {path: path.read_text() for path in previous} == previous
    assert mode(files.notify_hook) == 0o700
    assert mode(files.guard_raise) == mode(files.guard_lift) == 0o600
    # stop the old daemon, fail to start the new one, try the old one again
    assert system.calls[3:] == [("stop", "qrouter-r1"),
                                ("start", "qrouter-r1", "other"),
                                ("start", "qrouter-r1", "other")]


def test_add_refuses_a_namespace_with_another_conntrackd(conf, spec, system):
    class Foreign:
        pid = 777

        def cmdline(self):
            return ["conntrackd", "-C", "/var/lib/neutron/ha_confs/r1/conntrackd.conf"]

    system.foreign = [Foreign()]
    with pytest.raises(InvalidInput) as caught:
        manager.add_router(conf, spec, COMMAND)
    message = str(caught.value)
    assert "pid 777" in message and "ha_conntrackd_enabled" in message
    assert system.calls == []
    assert not manager.router_files(conf, "r1").directory.exists()


def test_remove_stops_conntrackd_lifts_the_guard_and_deletes_the_directory(
        cold_conf, spec, system):
    conf = cold_conf
    manager.add_router(conf, spec, COMMAND)
    files = manager.router_files(conf, "r1")
    assert manager.remove_router(conf, "r1") is True
    assert system.calls[-3:] == [("stop", "qrouter-r1"),
                                 ("lift-guard", "qrouter-r1", files.guard_lift),
                                 ("remove-refresh", "qrouter-r1")]
    assert not files.directory.exists()
    calls = len(system.calls)
    assert manager.remove_router(conf, "r1") is False
    assert len(system.calls) == calls


def test_remove_leaves_the_guard_of_a_namespace_that_is_gone(cold_conf, spec, system):
    conf = cold_conf
    manager.add_router(conf, spec, COMMAND)
    system.namespaces.clear()
    assert manager.remove_router(conf, "r1") is True
    assert system.calls[-1] == ("stop", "qrouter-r1")
    assert not any(call[0] == "lift-guard" for call in system.calls)
    assert not manager.router_files(conf, "r1").directory.exists()


def test_remove_completes_when_the_guard_cannot_be_lifted(conf, spec, system):
    manager.add_router(conf, spec, COMMAND)
    system.guard_error = GuardError("cannot run nft: [Errno 2] No such file or "
                                    "directory: 'nsenter'")
    assert manager.remove_router(conf, "r1") is True
    assert not manager.router_files(conf, "r1").directory.exists()


def test_add_with_warm_standby_loads_the_refreshes_and_lifts_a_guard_left_up(
        conf, spec, system):
    result = manager.add_router(conf, spec, COMMAND)
    files = result.rendered.files
    assert system.calls == [("start", "qrouter-r1", "other"),
                            ("apply-refresh", "qrouter-r1"),
                            ("sysctl", "qrouter-r1", LIBERAL),
                            ("lift-guard", "qrouter-r1", files.guard_lift)]
    assert "ct mark set" in files.refresh_rules.read_text()


def test_a_failed_first_add_removes_the_refreshes_it_loaded(conf, spec, system,
                                                            monkeypatch):
    def fail(spec, files):
        raise SnatSyncError("late failure")

    monkeypatch.setattr(manager, "_lift_guard_if_up", fail)
    with pytest.raises(SnatSyncError, match="late failure"):
        manager.add_router(conf, spec, COMMAND)
    assert system.calls[-1] == ("remove-refresh", "qrouter-r1")
    assert not manager.router_files(conf, "r1").directory.exists()


def test_add_with_the_guard_off_lifts_a_guard_left_up(make_conf, write_config, spec,
                                                     system, monkeypatch):
    conf = make_conf(write_config("[failover]\nreset_window_guard = false\n"))
    monkeypatch.setattr(manager.guard, "is_up", lambda namespace: True)
    manager.add_router(conf, spec, COMMAND)
    assert any(call[0] == "lift-guard" for call in system.calls)


def test_notify_treats_an_unreadable_spec_as_unknown(conf, spec, system):
    manager.add_router(conf, spec, COMMAND)
    manager.router_files(conf, "r1").spec.write_text('{"router": "r1"')
    with pytest.raises(InvalidInput, match="unknown here"):
        manager.notify(conf, "r1", ["primary"])


# -- status -------------------------------------------------------------------------

NETWORK_STATS = """\
sequence tracking statistics:
	recv:
		Packets lost:		                  12
UDP traffic (active device=ha-1a2b3c4d-5e):
                1424 Bytes sent              1778016 Bytes recv
                  36 Pckts sent                 1282 Pckts recv
	recv:
		Malformed header:	                   3
"""
QUEUE_STATS = "queue rsqueue:\ncurrent elements:\t\t          17\n"


def cache_stats_text(internal, external, internal_no_space=0, external_no_space=0):
    return (f"cache:internal\tactive objects:\t\t{internal:12d}\n"
            f"\t\tno space left in cache:\t{internal_no_space:12d}\n"
            f"cache:external\tactive objects:\t\t{external:12d}\n"
            f"\t\tno space left in cache:\t{external_no_space:12d}\n")


class FakeProcess:
    pid = 4242

    def create_time(self):
        return time.time() - 3600


class FakeNode:
    """A router's conntrackd, namespace and primary address, as status sees them."""

    def __init__(self, monkeypatch):
        self.running = True
        self.answers = {"cache": cache_stats_text(3, 20200), "network": NETWORK_STATS,
                        "queue": QUEUE_STATS}
        self.holds = False
        self.namespaces = {"qrouter-r1"}
        monkeypatch.setattr(manager, "running_conntrackd", lambda conf, specs: {
            router_id: FakeProcess() for router_id in specs if self.running})
        monkeypatch.setattr(conntrackd.Conntrackd, "stats",
                            lambda daemon, kind, timeout=None: self.answers.get(kind))
        monkeypatch.setattr(manager.namespace, "namespace_inode",
                            lambda name: 4026532000 if name in self.namespaces
                            else None)
        monkeypatch.setattr(manager.namespace, "kernel_entry_count",
                            lambda pid: 20210 if pid == FakeProcess.pid else None)
        monkeypatch.setattr(manager.namespace, "holds_address", self.holds_address)

    def holds_address(self, namespace, interface, address):
        assert (namespace, interface, str(address)) == (
            "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.0.7/24")
        return self.holds


@pytest.fixture
def node(monkeypatch):
    return FakeNode(monkeypatch)


def added(conf, primary_address="169.254.0.7/24", peers=("169.254.192.2",)):
    """A router's files as `router add` leaves them."""
    spec = RouterSpec.create("r1", "qrouter-r1", "ha-1a2b3c4d-5e", "169.254.192.1",
                             list(peers), 7, primary_address)
    files = manager.router_files(conf, "r1")
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.spec, spec.to_dict())
    return files


def write_health(files, checked=None, **overrides):
    statedir.write_json(files.health, {
        "checked": time.time() if checked is None else checked, "interval": 3.0,
        "role": "backup",
        "peers": [{"address": "169.254.192.2", "role": "primary",
                   "seen": time.time() - 0.5 if checked is None else checked - 0.5,
                   "internal": 20200, "external": 0, "kernel": 20210}],
        "problems": [],
        "repairs": [{"kind": "repair", "repair": "request-resync", "outcome": "done"}],
        **overrides})


def test_status_of_a_backup_in_sync(conf, node):
    files = added(conf)
    write_health(files)
    (status,) = manager.status(conf)
    assert status.router == "r1" and status.namespace == "qrouter-r1"
    assert (status.role, status.role_source) == ("backup", "address")
    (peer,) = status.peers
    assert (peer.address, peer.role, peer.internal_cache, peer.external_cache,
            peer.kernel_entries) == ("169.254.192.2", "primary", 20200, 0, 20210)
    assert peer.last_seen == pytest.approx(time.time() - 0.5, abs=2)
    assert 0.5 <= peer.figures_age_seconds <= 3
    assert (status.conntrackd_pid, status.conntrackd_alive) == (4242, True)
    assert 3599 <= status.conntrackd_uptime_seconds <= 3700
    assert status.conntrackd_started == pytest.approx(
        time.time() - status.conntrackd_uptime_seconds, abs=1)
    assert (status.kernel_entries, status.internal_cache, status.external_cache) == (
        20210, 3, 20200)
    assert status.replication == manager.ReplicationStats(
        packets_sent=36, packets_received=1282, messages_lost=12,
        messages_malformed=3, resend_queue=17, cache_full_drops=0)
    assert status.last_repair == {"kind": "repair", "repair": "request-resync",
                                  "outcome": "done"}
    assert status.problems == ()
    assert status.checked == pytest.approx(time.time(), abs=5)
    assert (status.verdict, status.reason) == (
        "in-sync", "replica holds 20210 of the primary's 20210 entries")
    # warm standby: the replica is this backup's kernel table
    assert (status.standby_mode, status.replica_entries, status.primary_entries,
            status.missing_entries) == ("warm", 20210, 20210, 0)
    assert json.loads(json.dumps(status.to_dict()))["replication"]["resend_queue"] == 17
    assert [field.name for field in dataclasses.fields(manager.RouterStatus)] == [
        "router", "namespace", "role", "role_source", "peers", "conntrackd_pid",
        "conntrackd_alive", "conntrackd_started", "conntrackd_uptime_seconds",
        "kernel_entries", "internal_cache", "external_cache", "replication",
        "last_transition", "last_repair", "problems", "checked", "verdict", "reason",
        "standby_mode", "replica_entries", "primary_entries", "missing_entries",
        "conntrackd_configuration"]


def test_status_of_a_router_without_peers_shows_the_peers_its_daemon_learned(
        conf, node):
    """A Neutron router: no peer list; the primary its daemon heard by multicast
    is its peer, and the replica is judged against it."""
    write_health(added(conf, peers=()))
    (status,) = manager.status(conf)
    (peer,) = status.peers
    assert (peer.address, peer.role, peer.kernel_entries) == (
        "169.254.192.2", "primary", 20210)
    assert (status.verdict, status.reason) == (
        "in-sync", "replica holds 20210 of the primary's 20210 entries")


def test_a_router_without_peers_none_heard_yet_is_degraded(conf, node):
    write_health(added(conf, peers=()), peers=[])
    (status,) = manager.status(conf)
    assert status.peers == ()
    assert status.verdict == "degraded"
    assert "no report from the primary's daemon" in status.reason


def test_a_cold_standby_backups_replica_is_its_external_cache(conf, node):
    conf.set_override("standby_mode", "cold", "failover")
    write_health(added(conf))
    (status,) = manager.status(conf)
    assert (status.verdict, status.reason) == (
        "in-sync", "replica holds 20200 of the primary's 20210 entries")
    assert (status.replica_entries, status.primary_entries,
            status.missing_entries) == (20200, 20210, 10)


def test_a_backup_on_a_stale_primary_report_is_not_in_sync(conf, node):
    files = added(conf)
    checked = time.time() - 8
    write_health(files, checked=checked)  # the file is fresh, its peer not
    os.utime(files.health, (checked, checked))  # and no check confirmed it since
    (status,) = manager.status(conf)
    assert status.verdict == "degraded"
    assert "latest report is 9 s old" in status.reason
    assert status.missing_entries is None


def test_the_role_comes_from_the_primary_address_then_the_last_transition(conf,
                                                                           node):
    files = added(conf)
    statedir.write_json(files.last_transition, {"role": "fault", "outcome": "done"})
    node.holds = True
    assert (manager.status(conf)[0].role, manager.status(conf)[0].role_source) == (
        "primary", "address")
    node.holds = None  # the HA interface cannot be read
    (status,) = manager.status(conf)
    assert (status.role, status.role_source) == ("backup", "last-transition")
    files.last_transition.unlink()
    (status,) = manager.status(conf)
    assert (status.role, status.role_source) == ("unknown", "none")
    assert status.verdict == "degraded"


def test_without_a_primary_address_the_last_transition_tells_the_role(conf, node,
                                                                        monkeypatch):
    files = added(conf, primary_address=None)
    monkeypatch.setattr(manager.namespace, "holds_address",
                        lambda *arguments: pytest.fail("no address to look for"))
    statedir.write_json(files.last_transition, {"role": "primary", "outcome": "done"})
    (status,) = manager.status(conf)
    assert (status.role, status.role_source) == ("primary", "last-transition")
    statedir.write_json(files.last_transition, ["not", "a", "record"])
    (status,) = manager.status(conf)
    assert (status.role, status.last_transition) == ("unknown", None)


def test_a_full_cache_is_logged_and_breaks_the_router(conf, node, caplog):
    files = added(conf)
    write_health(files)
    node.answers["cache"] = cache_stats_text(131072, 20200, 69000, 5)
    (status,) = manager.status(conf)
    assert status.replication.cache_full_drops == 69005
    assert status.verdict == "broken"
    assert "raise [conntrackd] hash_limit" in status.reason
    assert ("69005 entries were dropped and will not survive a failover"
            in caplog.text)


def test_a_stale_health_check_keeps_its_figures_but_not_its_problems(conf, node):
    files = added(conf)
    write_health(files, checked=time.time() - 60, problems=[
        {"kind": "split-brain", "severity": "broken", "since": 1000.0,
         "message": "split brain: peer 169.254.192.2 is primary too"}])
    (status,) = manager.status(conf)
    assert status.problems == ()
    assert status.peers[0].role == "primary"
    assert status.checked == pytest.approx(time.time() - 60, abs=5)
    assert status.verdict == "degraded"
    assert status.reason.startswith("no health check from the node daemon in 6")


def test_fresh_problems_are_listed_and_judged(conf, node):
    files = added(conf)
    write_health(files, problems=[
        {"kind": "messages-lost", "severity": "degraded", "since": 1000.0,
         "message": "12 sync messages lost since the last check"}])
    (status,) = manager.status(conf)
    assert status.problems == ("12 sync messages lost since the last check",)
    assert (status.verdict, status.reason) == ("degraded", status.problems[0])


def test_the_daemons_replica_short_is_judged_again_on_the_live_figures(conf, node):
    """The daemon found the replica short at its last check; the replica read now
    is complete: that is newer, and the verdict follows it."""
    files = added(conf)
    write_health(files, problems=[
        {"kind": "replica-short", "severity": "degraded", "since": 1000.0,
         "message": "replica holds 0 of the primary 169.254.192.2's 20200 entries"}])
    (status,) = manager.status(conf)
    assert status.problems == (
        "replica holds 0 of the primary 169.254.192.2's 20200 entries",)
    assert status.verdict == "in-sync"


def test_status_of_a_router_whose_conntrackd_is_down(conf, node):
    files = added(conf, peers=("169.254.192.2", "169.254.192.3"))
    write_health(files)
    node.running = False
    (status,) = manager.status(conf)
    assert (status.conntrackd_pid, status.conntrackd_alive) == (None, False)
    assert status.conntrackd_started is status.conntrackd_uptime_seconds is None
    assert status.kernel_entries is status.internal_cache is None
    assert status.replication is None
    assert [peer.address for peer in status.peers] == ["169.254.192.2",
                                                       "169.254.192.3"]
    assert status.peers[1] == manager.PeerStatus("169.254.192.3", "unknown", None,
                                                 None, None)
    assert (status.verdict, status.reason) == ("broken", "conntrackd is not running")


def test_replication_is_unknown_when_conntrackd_answers_only_for_its_caches(conf,
                                                                             node):
    added(conf)
    del node.answers["network"]
    (status,) = manager.status(conf)
    assert status.external_cache == 20200
    assert status.replication is None


def test_status_of_a_router_whose_namespace_or_spec_is_gone(conf, node):
    files = added(conf)
    node.namespaces.clear()
    node.running = False
    assert manager.status(conf)[0].reason == "namespace qrouter-r1 does not exist"
    files.spec.write_text("{")
    (status,) = manager.status(conf)
    assert (status.namespace, status.peers, status.verdict, status.reason) == (
        "", (), "broken", "its spec.json is missing or unreadable")
