"""The node manager with the system faked out: what `router add` writes, what it
undoes when starting conntrackd fails, and `router remove`."""

import ipaddress
import json
import os
import stat

import pytest

from snat_sync import conntrackd
from snat_sync import manager
from snat_sync import render
from snat_sync.conntrackd import ConntrackdError
from snat_sync.errors import InvalidInput
from snat_sync.guard import GuardError
from snat_sync.router import RouterSpec

FACTS = render.NamespaceFacts(ipaddress.ip_network("169.254.192.0/18"), 262144)
COMMAND = ["/usr/bin/python3", "-m", "snat_sync", "--state-path", "/state"]


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


def test_generate_is_pure_and_complete(conf, spec, state_path):
    files = manager.router_files(conf, "r1")
    rendered = manager.generate(conf, spec, FACTS, files, COMMAND)
    contents = rendered.contents()
    assert list(contents) == [files.spec, files.conntrackd_config, files.guard_raise,
                              files.guard_lift, files.notify_hook]
    assert [each[1] for each in contents.values()] == [0o600] * 4 + [0o700]
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


def test_add_writes_the_files_and_starts_conntrackd(conf, spec, system):
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
    assert result.changed_files == (files.spec, files.conntrackd_config,
                                    files.guard_raise, files.guard_lift,
                                    files.notify_hook)
    assert result.conntrackd_started is True
    assert system.calls == [("start", "qrouter-r1", "other")]


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


def test_add_with_other_arguments_restarts_with_the_new_config(conf, spec, system):
    manager.add_router(conf, spec, COMMAND)
    moved = RouterSpec.create("r1", "qrouter-r1-new", "ha-1a2b3c4d-5e",
                              "169.254.192.1", ["169.254.192.2"], 9)
    result = manager.add_router(conf, moved, COMMAND)
    assert system.calls == [("start", "qrouter-r1", "other"),
                            ("stop", "qrouter-r1"),
                            ("start", "qrouter-r1-new", "other")]
    assert "Port 3789" in result.rendered.files.conntrackd_config.read_text()


def test_a_new_router_whose_conntrackd_fails_leaves_nothing(conf, spec, system):
    system.start_error = ConntrackdError("conntrackd for r1 failed to start")
    with pytest.raises(ConntrackdError):
        manager.add_router(conf, spec, COMMAND)
    assert not manager.router_files(conf, "r1").directory.exists()


def test_a_failed_reconcile_restores_the_previous_router(conf, spec, system):
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
    assert system.calls[1:] == [("stop", "qrouter-r1"),
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
        conf, spec, system):
    manager.add_router(conf, spec, COMMAND)
    files = manager.router_files(conf, "r1")
    assert manager.remove_router(conf, "r1") is True
    assert system.calls[-2:] == [("stop", "qrouter-r1"),
                                 ("lift-guard", "qrouter-r1", files.guard_lift)]
    assert not files.directory.exists()
    calls = len(system.calls)
    assert manager.remove_router(conf, "r1") is False
    assert len(system.calls) == calls


def test_remove_leaves_the_guard_of_a_namespace_that_is_gone(conf, spec, system):
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
