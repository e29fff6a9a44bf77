"""The node daemon: its pure decisions, reading the state path, and its event loop
driven with stand-in jobs (no root, no namespace, no conntrackd)."""

import json
import os
import subprocess
import time

import pytest

from snat_sync import conntrackd as conntrackd_module
from snat_sync import daemon as daemon_module
from snat_sync import failover
from snat_sync import health_check
from snat_sync import inventory
from snat_sync import jobs as jobs_module
from snat_sync import reconcile
from snat_sync import statedir
from snat_sync.reconcile import Action, desired_routers, reconcile_plan, restore_steps
from snat_sync.roles import Role
from snat_sync.router import RouterSpec


def make_spec(router_id, vrid=7, peer="169.254.192.2", primary=None):
    return RouterSpec.create(router_id, f"qrouter-{router_id}", "ha-1a2b3c4d-5e",
                             "169.254.192.1", [peer] if peer else [], vrid, primary)


# -- reconcile_plan ------------------------------------------------------------------


def test_plan_adds_a_new_router_and_starts_a_stopped_one():
    a, b = make_spec("a"), make_spec("b")
    plan = reconcile_plan({"a": a, "b": b}, {"b": b}, running=set())
    assert plan == (Action("add", "a", a), Action("start", "b", b))


def test_plan_does_nothing_when_everything_runs():
    a = make_spec("a")
    assert reconcile_plan({"a": a}, {"a": a}, running={"a"}) == ()


def test_plan_re_adds_a_changed_router_even_while_it_runs():
    old, new = make_spec("a", vrid=7), make_spec("a", vrid=8)
    assert reconcile_plan({"a": new}, {"a": old}, running={"a"}) == (
        Action("add", "a", new),)


def test_plan_removes_a_router_no_longer_desired():
    a = make_spec("a")
    assert reconcile_plan({}, {"a": a}, running={"a"}) == (Action("remove", "a"),)


def test_plan_is_ordered_by_router():
    specs = {name: make_spec(name) for name in ("c", "a", "b")}
    assert [action.router_id for action in reconcile_plan(specs, {}, set())] == [
        "a", "b", "c"]


# -- desired_routers -------------------------------------------------------------------


def test_routers_added_by_hand_stay_desired():
    a = make_spec("a")
    assert desired_routers({"a": a}, set(), {}) == {"a": a}


def test_a_neutron_router_without_its_file_is_not_desired():
    a = make_spec("a")
    assert desired_routers({"a": a}, {"a"}, {}) == {}


def test_neutron_files_add_and_change_routers():
    old, new, b = make_spec("a", vrid=7), make_spec("a", vrid=8), make_spec("b")
    assert desired_routers({"a": old}, {"a"}, {"a": new, "b": b}) == {"a": new, "b": b}


def test_an_unreadable_neutron_file_keeps_the_router_as_it_is():
    a = make_spec("a")
    assert desired_routers({"a": a}, {"a"}, {"a": None, "b": None}) == {"a": a}


# -- restoring a restarted conntrackd ----------------------------------------------------


def test_restore_on_the_primary_resyncs_from_the_kernel_then_bulk_sends():
    assert [step.arguments for step in restore_steps(Role.PRIMARY, "cold")] == [
        ("-R",), ("-B",)]
    assert [step.arguments for step in restore_steps(Role.PRIMARY)] == [
        (Role.PRIMARY,), ("-R",), ("-B",)]
    assert restore_steps(Role.PRIMARY)[1].redundant_after_start


def test_restore_on_a_warm_backup_forgets_the_adopted_table_then_asks_for_a_resync():
    """A new conntrackd reads its kernel table as its own; on a warm backup those
    are the replicated entries, whose ends it must not report to the primary. It
    runs the backup's configuration, which reads no events."""
    assert [step.arguments for step in restore_steps(Role.BACKUP)] == [
        (Role.BACKUP,), ("-f", "internal"), ("-n",)]


def test_restore_on_a_cold_backup_asks_the_primary_for_a_resync():
    assert [step.arguments for step in restore_steps(Role.BACKUP, "cold")] == [
        ("-n",)]


@pytest.mark.parametrize("role", [Role.FAULT, Role.STOP, None])
def test_cold_standby_has_nothing_to_restore_otherwise(role):
    assert restore_steps(role, "cold") == ()


@pytest.mark.parametrize("role", [Role.FAULT, Role.STOP, None])
def test_warm_standby_otherwise_only_forgets_the_adopted_table(role):
    assert [step.arguments for step in restore_steps(role)] == [
        (Role.BACKUP,), ("-f", "internal")]


@pytest.mark.parametrize("recorded, holds, current, role", [
    (Role.PRIMARY, None, True, Role.PRIMARY),
    (Role.PRIMARY, None, False, None),  # a node returning with an old record
    (Role.BACKUP, None, False, Role.BACKUP),
    (None, None, True, None),
    (Role.PRIMARY, False, True, Role.BACKUP),  # the address says otherwise
    (Role.BACKUP, True, False, Role.PRIMARY),
    (None, True, False, Role.PRIMARY),
])
def test_restore_role_prefers_the_live_address_then_a_current_record(
        recorded, holds, current, role):
    assert reconcile.restore_role(recorded, holds, current) is role


@pytest.mark.parametrize("record, role", [
    ({"role": "primary"}, Role.PRIMARY),
    ({"role": "backup", "outcome": "failed"}, Role.BACKUP),
    ({"role": "bogus"}, None),
    ({}, None),
    (None, None),
    (["primary"], None),
])
def test_recorded_role(record, role):
    assert reconcile.recorded_role(record) is role


class FakeConntrackd:
    def __init__(self, starts=True):
        self.starts = starts
        self.calls = []

    def start(self, scheduler):
        self.calls.append("start")
        return self.starts

    def run_as(self, role, scheduler):
        self.calls.append(f"run as {role.value}")
        return False

    def control(self, *arguments, timeout=None, check=True):
        self.calls.append(arguments)

    def process(self):
        return None


@pytest.mark.parametrize("role, expected", [
    # A conntrackd just started has read the kernel's table: no -R.
    ("primary", ["start", "run as primary", ("-B",)]),
    ("backup", ["start", "run as backup", ("-f", "internal"), ("-n",)]),
])
def test_start_restores_the_recorded_role(conf, router_files, monkeypatch, role,
                                          expected, no_table_server):
    fake = FakeConntrackd()
    fake.files = router_files
    monkeypatch.setattr(jobs_module.manager, "daemon_for", lambda *a: fake)
    statedir.write_json(router_files.spec, make_spec("r1").to_dict())
    statedir.write_json(router_files.last_transition, {"role": role})

    jobs_module.start(conf, make_spec("r1"), record_is_current=True)

    assert fake.calls == expected


def test_a_start_without_a_current_record_never_restores_a_primary(
        conf, router_files, monkeypatch, caplog):
    """The daemon starting on a node back from a crash finds conntrackd stopped and
    a record that says primary: sending that table to the real primary would
    overwrite its live entries with old ones."""
    fake = FakeConntrackd()
    monkeypatch.setattr(jobs_module.manager, "daemon_for", lambda *a: fake)
    statedir.write_json(router_files.spec, make_spec("r1").to_dict())
    statedir.write_json(router_files.last_transition, {"role": "primary"})

    jobs_module.start(conf, make_spec("r1"))

    assert fake.calls == ["start", "run as backup", ("-f", "internal")]
    assert "not restoring it as primary" in caplog.text


def test_start_of_a_running_conntrackd_restores_nothing(conf, router_files,
                                                        monkeypatch):
    fake = FakeConntrackd(starts=False)
    monkeypatch.setattr(jobs_module.manager, "daemon_for", lambda *a: fake)
    statedir.write_json(router_files.spec, make_spec("r1").to_dict())
    statedir.write_json(router_files.last_transition, {"role": "primary"})

    jobs_module.start(conf, make_spec("r1"))

    assert fake.calls == ["start"]


class RestartingConntrackd(FakeConntrackd):
    """A conntrackd that runs until the add under test restarts it, or not."""

    def __init__(self, was_running):
        super().__init__()
        self.running = was_running

    def process(self):
        return object() if self.running else None


def fake_add_router(conntrackd, router_files):
    def add_router(conf, spec, command):
        conntrackd.calls.append("add: stop, write, start")
        conntrackd.running = True
        return jobs_module.manager.AddResult(
            rendered=type("Rendered", (), {"files": router_files})(),
            changed_files=(router_files.conntrackd_config,), conntrackd_started=True,
            pid=4242)
    return add_router


@pytest.mark.parametrize("was_running, expected", [
    # restarted by the add (the configuration changed): the node is as recorded
    (True, ["add: stop, write, start", "run as primary", ("-B",)]),
    # not running before the add: maybe back from a crash, never as primary
    (False, ["add: stop, write, start", "run as backup", ("-f", "internal")]),
])
def test_an_add_that_restarts_a_running_primary_restores_it_as_primary(
        conf, router_files, monkeypatch, was_running, expected):
    """Found by the soak: a SIGHUP on the primary re-rendered conntrackd.conf
    (nf_conntrack_max had changed, so HashLimit had), the add restarted
    conntrackd, and the restore forgot the primary's table ("not restoring it as
    primary") while it carried the traffic."""
    fake = RestartingConntrackd(was_running)
    monkeypatch.setattr(jobs_module.manager, "daemon_for", lambda *a: fake)
    monkeypatch.setattr(jobs_module.manager, "add_router",
                        fake_add_router(fake, router_files))
    statedir.write_json(router_files.last_transition, {"role": "primary"})

    assert jobs_module.add(conf, make_spec("r1"), "snat-sync", False) == 4242

    assert fake.calls == expected


def test_a_router_removed_meanwhile_is_not_started_again(conf, router_files,
                                                         monkeypatch):
    fake = FakeConntrackd()
    monkeypatch.setattr(jobs_module.manager, "daemon_for", lambda *a: fake)

    assert jobs_module.start(conf, make_spec("r1")) is False
    assert fake.calls == []


# -- failover.is_already_done (the second of two triggers is a no-op) -----------------


@pytest.mark.parametrize("record, role, latest, done", [
    ({"role": "primary", "outcome": "done", "arrived": 10.0}, Role.PRIMARY, None, True),
    ({"role": "primary", "outcome": "done", "arrived": 10.0}, Role.PRIMARY,
     statedir.LatestArrival(10.0), True),
    # a MASTER hook committed after the record, its own transition superseded
    ({"role": "backup", "outcome": "done", "arrived": 10.0}, Role.BACKUP,
     statedir.LatestArrival(11.0), False),
    # a third trigger of the same change: the second only confirmed
    ({"role": "primary", "outcome": "done", "arrived": 10.0}, Role.PRIMARY,
     statedir.LatestArrival(11.0, confirmed_only=True), True),
    ({"role": "primary", "outcome": "failed"}, Role.PRIMARY, None, False),
    ({"role": "backup", "outcome": "done"}, Role.PRIMARY, None, False),
    (None, Role.BACKUP, None, False),
])
def test_is_already_done(record, role, latest, done):
    assert failover.is_already_done(record, role, latest) is done


def test_a_transition_already_done_is_not_redone(conf, router_files):
    statedir.write_json(router_files.last_transition,
                        {"role": "primary", "outcome": "done", "arrived": 1.0})

    record = failover.run_transition("r1", Role.PRIMARY, FakeConntrackd(),
                                     router_files, conf, 2.0, skip_if_done=True)

    assert record.outcome == "already-done" and record.steps == []
    assert statedir.read_json(router_files.last_transition)["arrived"] == 1.0


# -- reading the state path ----------------------------------------------------------------


def write_router(state_path, spec, neutron=False):
    files = statedir.RouterFiles.under(state_path, spec.router_id)
    statedir.ensure_directory(files.directory)
    statedir.write_json(files.spec, spec.to_dict())
    if neutron:
        (files.directory / inventory.NEUTRON_MARKER).write_text("")


def write_neutron_file(state_path, name, content):
    directory = state_path / inventory.NEUTRON_DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(content)


def test_read_configured_knows_which_routers_neutron_added(state_path):
    a, b = make_spec("a"), make_spec("b", primary="169.254.0.7/24")
    write_router(state_path, a)
    write_router(state_path, b, neutron=True)
    (state_path / "routers" / "broken").mkdir()
    (state_path / "routers" / "broken" / "spec.json").write_text("{")

    assert inventory.read_configured(state_path) == ({"a": a, "b": b}, {"b"})


def test_read_neutron_specs_marks_bad_files(state_path):
    good = make_spec("good", peer=None, primary="169.254.0.7/24")
    write_neutron_file(state_path, "good.json", json.dumps(good.to_dict()))
    write_neutron_file(state_path, "bad.json", json.dumps({"router": "bad"}))
    write_neutron_file(state_path, "other.json", json.dumps(good.to_dict()))
    write_neutron_file(state_path, ".good.json.tmp", "{")

    assert inventory.read_neutron_specs(state_path) == {
        "bad": None, "good": good, "other": None}


def test_config_argument():
    assert conntrackd_module.config_argument(
        ["conntrackd", "-C", "/x/conntrackd.conf", "-d"]) == "/x/conntrackd.conf"
    assert conntrackd_module.config_argument(["conntrackd", "-C"]) is None


# -- the event loop, with stand-in jobs -------------------------------------------------------


@pytest.fixture
def stand_ins(monkeypatch):
    """Replace the jobs and the process scan; record what the daemon asked for."""
    calls = []
    running = {}
    processes = []

    def launch(spec):
        process = subprocess.Popen(["sleep", "60"])
        processes.append(process)
        running[spec.router_id] = process.pid
        return process.pid

    def start(conf, spec, record_is_current=False):
        calls.append(("start", spec.router_id))
        return launch(spec)

    def add(conf, spec, command, from_neutron):
        calls.append(("add", spec.router_id, from_neutron))
        write_router(conf.state_path_for_test, spec, neutron=from_neutron)
        return launch(spec)

    def remove(conf, router_id):
        calls.append(("remove", router_id))
        import shutil
        shutil.rmtree(conf.state_path_for_test / "routers" / router_id)
        return True

    monkeypatch.setattr(jobs_module, "start", start)
    monkeypatch.setattr(jobs_module, "add", add)
    monkeypatch.setattr(daemon_module.manager, "remove_router", remove)
    monkeypatch.setattr(inventory, "running_daemons",
                        lambda conf, configured: {key: value for key, value
                                                  in running.items()
                                                  if key in configured})

    def check_all(conf, checks):
        check_all.calls.append(tuple(router_id for router_id, _ in checks))
        return {router_id: health_check.HealthState(written=1.0)
                for router_id, _ in checks}

    check_all.calls = []
    monkeypatch.setattr(health_check, "check_all", check_all)
    yield calls, running, processes
    for process in processes:
        process.kill()
        process.wait()


class ConfView:
    """conf with the test's state path at hand for the stand-ins."""

    def __init__(self, conf, state_path):
        self._conf = conf
        self.state_path_for_test = state_path

    def __getattr__(self, name):
        return getattr(self._conf, name)


def run_until(node, predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node.run_once(timeout=0.05)
        if predicate():
            return True
    return False


@pytest.fixture
def node(conf, state_path, stand_ins):
    built = daemon_module.Daemon(ConfView(conf, state_path), ["snat-sync"], workers=2)
    yield built
    built.shutdown()


def test_daemon_adds_neutron_routers_and_restarts_a_killed_conntrackd(
        node, state_path, stand_ins):
    calls, running, processes = stand_ins
    spec = make_spec("a", peer=None, primary="169.254.0.7/24")
    write_neutron_file(state_path, "a.json", json.dumps(spec.to_dict()))

    assert run_until(node, lambda: "a" in node.tracked and node.tracked["a"].pid)
    assert calls == [("add", "a", True)]

    os.kill(processes[0].pid, 9)
    assert run_until(node, lambda: len(calls) == 2)
    assert calls[1] == ("start", "a")
    assert run_until(node, lambda: node.tracked["a"].pid == processes[1].pid)


def test_daemon_removes_a_neutron_router_whose_file_is_gone(node, state_path,
                                                            stand_ins):
    calls, _running, _processes = stand_ins
    spec = make_spec("a", peer=None, primary="169.254.0.7/24")
    write_neutron_file(state_path, "a.json", json.dumps(spec.to_dict()))
    assert run_until(node, lambda: "a" in node.tracked)

    (state_path / "neutron" / "a.json").unlink()

    assert run_until(node, lambda: ("remove", "a") in calls)
    assert run_until(node, lambda: "a" not in node.tracked)


def test_daemon_starts_a_configured_router_and_leaves_it_running_on_exit(
        conf, state_path, stand_ins):
    calls, _running, processes = stand_ins
    write_router(state_path, make_spec("a"))
    node = daemon_module.Daemon(ConfView(conf, state_path), ["snat-sync"], workers=2)
    try:
        assert run_until(node, lambda: calls == [("start", "a")])
    finally:
        node.shutdown()
    assert processes[0].poll() is None


def test_plan_rerender_adds_every_desired_router_again():
    a = make_spec("a")
    assert reconcile_plan({"a": a}, {"a": a}, {"a"}, rerender=True) == (
        Action("add", "a", a),)


def test_sighup_re_reads_the_options_and_re_adds_every_router(
        conf, state_path, stand_ins):
    calls, _running, _processes = stand_ins
    write_router(state_path, make_spec("a"))
    node = daemon_module.Daemon(ConfView(conf, state_path), ["snat-sync"], workers=2)
    try:
        assert run_until(node, lambda: ("start", "a") in calls)
        node._on_signal(daemon_module.signal.SIGHUP, None)
        assert run_until(node, lambda: ("add", "a", False) in calls)
    finally:
        node.shutdown()


class FakeWatcher:
    def __init__(self, changes):
        self.changes = changes

    def read(self):
        return self.changes


def test_address_events_run_transitions_in_order(node, state_path, stand_ins,
                                                 monkeypatch):
    seen = []
    monkeypatch.setattr(jobs_module, "transition",
                        lambda conf, router_id, role, arrived: seen.append(role))
    write_router(state_path, make_spec("a"))
    assert run_until(node, lambda: "a" in node.tracked and node.tracked["a"].pid)
    node.tracked["a"].watcher = FakeWatcher([Role.PRIMARY, Role.BACKUP])

    node.routers.on_event("watch", "a")

    assert run_until(node, lambda: seen == [Role.PRIMARY, Role.BACKUP])
    node.tracked["a"].watcher = None


def test_a_watcher_transition_that_restarts_conntrackd_is_tracked_again(
        node, state_path, stand_ins, monkeypatch):
    """run-as-primary restarts conntrackd inside the transition job: the loop sees
    the old process exit while the router is busy (no restart of its own), and
    must pick up the new process when the job is done."""
    _calls, _running, processes = stand_ins
    launch = []

    def transition(conf, router_id, role, arrived):
        old = processes[-1]
        old.kill()
        old.wait()
        launch.append(subprocess.Popen(["sleep", "60"]))
        processes.append(launch[-1])
        _running[router_id] = launch[-1].pid
        return True

    monkeypatch.setattr(jobs_module, "transition", transition)
    write_router(state_path, make_spec("a"))
    assert run_until(node, lambda: "a" in node.tracked and node.tracked["a"].pid)
    node.tracked["a"].watcher = FakeWatcher([Role.PRIMARY])

    node.routers.on_event("watch", "a")

    assert run_until(node, lambda: launch and node.tracked["a"].pid == launch[0].pid)
    node.tracked["a"].watcher = None


def test_running_routers_are_health_checked_in_one_job(node, state_path, stand_ins):
    for name in ("a", "b"):
        write_router(state_path, make_spec(name))
    assert run_until(node, lambda: all(
        name in node.tracked and node.tracked[name].pid for name in ("a", "b")))
    node.next_check = 0.0
    # One job for both, in whichever order their conntrackd came up.
    assert run_until(node, lambda: any(sorted(call) == ["a", "b"]
                                       for call in health_check.check_all.calls))
    assert run_until(node, lambda: node.tracked["a"].health.written == 1.0)
