"""The failover state machine: parsing keepalived's arguments, the plan for each
role, and running it under the router's lock."""

import threading
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snat_sync import failover
from snat_sync import statedir
from snat_sync.conntrackd import Conntrackd, ConntrackdError
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.failover import HookCommit, Role

COMMIT_LOG = """\
[Tue Nov 24 20:13:50 2026] (pid=3092) [notice] committing all external caches
[Tue Nov 24 20:13:50 2026] (pid=3092) [notice] Committed 3 new entries
[Tue Nov 24 20:13:50 2026] (pid=3092) [notice] commit has taken 0.000010 seconds
[Tue Nov 24 20:13:56 2026] (pid=3092) [notice] committing all external caches
[Tue Nov 24 20:13:56 2026] (pid=3092) [notice] Committed 99993 new entries
[Tue Nov 24 20:13:56 2026] (pid=3092) [notice] 7 entries can't be committed
[Tue Nov 24 20:13:56 2026] (pid=3092) [notice] commit has taken 0.461250 seconds
"""
LAST_COMMIT = {"committed": 99993, "failed": 7, "seconds": 0.46125}


# -- parse_notify_arguments ---------------------------------------------------------


@pytest.mark.parametrize("arguments, role", [
    (["primary"], Role.PRIMARY),
    (["backup"], Role.BACKUP),
    (["fault"], Role.FAULT),
    (["stop"], Role.STOP),
    (["MASTER"], Role.PRIMARY),
    (["BACKUP"], Role.BACKUP),
    (["FAULT"], Role.FAULT),
    (["STOP"], Role.STOP),
    (["DELETED"], Role.STOP),
    (["INSTANCE", "VR_7", "MASTER", "50"], Role.PRIMARY),
    (["INSTANCE", "VR_7", "BACKUP", "0"], Role.BACKUP),
    (["INSTANCE", "VR_7", "FAULT", "255"], Role.FAULT),
    (["INSTANCE", "VR_7", "STOP", "100"], Role.STOP),
    (["GROUP", "g", "BACKUP", "100"], Role.BACKUP),
    (["INSTANCE", "x", "DELETED", "0"], Role.STOP),
])
def test_parse_notify_arguments(arguments, role):
    assert failover.parse_notify_arguments(arguments) is role


@pytest.mark.parametrize("arguments, field", [
    ([], "notify arguments"),
    (["INSTANCE", "VR_7"], "notify arguments"),
    (["INSTANCE", "VR_7", "MASTER"], "notify arguments"),
    (["INSTANCE", "VR_7", "MASTER", "50", "extra"], "notify arguments"),
    (["PRIMARY"], "notify state"),
    (["master"], "notify state"),
    (["BOGUS"], "notify state"),
    (["VRRP", "VR_7", "MASTER", "50"], "notify type"),
    (["instance", "VR_7", "MASTER", "50"], "notify type"),
    (["INSTANCE", "VR_7", "BOGUS", "50"], "notify state"),
    (["INSTANCE", "VR_7", "primary", "50"], "notify state"),
    (["INSTANCE", "VR_7", "MASTER", "abc"], "notify priority"),
    (["INSTANCE", "VR_7", "MASTER", "300"], "notify priority"),
    (["INSTANCE", "VR_7", "MASTER", "256"], "notify priority"),
    (["INSTANCE", "VR_7", "MASTER", "-1"], "notify priority"),
    (["INSTANCE", "VR_7", "MASTER", ""], "notify priority"),
    (["INSTANCE", "VR_7", "MASTER", "²"], "notify priority"),
])
def test_parse_notify_arguments_rejects(arguments, field):
    with pytest.raises(InvalidInput) as caught:
        failover.parse_notify_arguments(arguments)
    assert caught.value.field == field
    assert caught.value.exit_status == 2


KEEPALIVED_LIKE = st.tuples(
    st.sampled_from(["INSTANCE", "GROUP", "instance", ""]),
    st.text(max_size=6),
    st.sampled_from([*failover.KEEPALIVED_STATES, "primary", "BOGUS"]),
    st.one_of(st.integers(-5, 300).map(str), st.text(max_size=4)),
).map(list)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(st.text(max_size=8), max_size=5), KEEPALIVED_LIKE))
def test_parse_notify_arguments_returns_a_role_or_rejects(arguments):
    """Whatever keepalived or an operator passes: a Role, or InvalidInput."""
    try:
        role = failover.parse_notify_arguments(arguments)
    except InvalidInput:
        return
    assert isinstance(role, Role)


# -- plan and supersession ----------------------------------------------------------


def names(steps):
    return [step.name for step in steps]


def test_plan_primary():
    steps = failover.plan(Role.PRIMARY)
    assert names(steps) == ["commit", "flush-caches", "resync-from-kernel",
                            "bulk-send"]
    assert [step.arguments for step in steps] == [("-c",), ("-f",), ("-R",), ("-B",)]
    assert [step.uses_commit_timeout for step in steps] == [True, False, False, False]
    assert failover.plan(Role.PRIMARY, resync_on_backup=False) == steps


def test_plan_backup():
    steps = failover.plan(Role.BACKUP)
    assert names(steps) == ["ensure-running", "shorten-timers", "request-resync"]
    assert steps[0].starts_daemon and not steps[1].starts_daemon
    assert [step.arguments for step in steps[1:]] == [("-t",), ("-n",)]


def test_plan_backup_without_resync():
    assert names(failover.plan(Role.BACKUP, resync_on_backup=False)) == [
        "ensure-running", "shorten-timers"]


@pytest.mark.parametrize("role", [Role.FAULT, Role.STOP])
def test_plan_fault_and_stop(role):
    assert names(failover.plan(role)) == ["shorten-timers"]


@pytest.mark.parametrize("last, arrived, superseded", [
    (None, 100.0, False),
    ({}, 100.0, False),
    ({"arrived": 50.0}, 100.0, False),
    ({"arrived": 100.0}, 100.0, False),
    ({"arrived": 100.5}, 100.0, True),
])
def test_is_superseded(last, arrived, superseded):
    assert failover.is_superseded(last, arrived) is superseded


def test_hook_commit_parse():
    assert HookCommit.parse("1700000000.25,1700000000.75,0") == HookCommit(
        1700000000.25, 1700000000.75, 0)
    for bad in ("", "1,2", "1,2,3,4", "a,b,c", "1.0,2.0,x"):
        with pytest.raises(InvalidInput, match="hook commit"):
            HookCommit.parse(bad)


# -- run_transition -----------------------------------------------------------------


class FakeDaemon:
    """Records what a transition asks of conntrackd; fails or stalls on request."""

    def __init__(self, files, fail=(), delay=0.0, on_control=None):
        self.files = files
        self.calls = []
        self.fail = fail
        self.delay = delay
        self.on_control = on_control

    def start(self, scheduler_policy="other"):
        self.calls.append(("start", scheduler_policy))
        return False

    def control(self, *arguments, timeout=None, check=True):
        self.calls.append(("control", arguments, timeout))
        if self.on_control:
            self.on_control(arguments)
        time.sleep(self.delay)
        if arguments[0] in self.fail:
            raise ConntrackdError(f"conntrackd {' '.join(arguments)} failed (exit 1): "
                                  "cannot connect")


@pytest.fixture
def files(router_files):
    router_files.log_file.write_text(COMMIT_LOG)
    return router_files


def fast_options(lock_timeout=0.2, resync_on_backup=True):
    """Options as run_transition reads them, with a lock timeout below oslo's 1 s."""
    return types.SimpleNamespace(
        failover=types.SimpleNamespace(lock_timeout=lock_timeout,
                                       resync_on_backup=resync_on_backup),
        conntrackd=types.SimpleNamespace(commit_timeout=60, control_timeout=10,
                                         scheduler="other"),
    )


def test_primary_runs_the_exact_commands_in_order(files, conf, fp):
    daemon = Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5)
    commands = [["conntrackd", "-C", str(files.conntrackd_config), flag]
                for flag in ("-c", "-f", "-R", "-B")]
    for command in commands:
        fp.register(command)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert list(fp.calls) == commands
    assert record.outcome == "done"
    assert record.errors == []
    assert [step.name for step in record.steps] == [
        "commit", "flush-caches", "resync-from-kernel", "bulk-send"]
    assert all(step.ok and step.run_by == "snat-sync" for step in record.steps)
    assert record.commit == LAST_COMMIT


def test_primary_uses_the_commit_timeout_for_the_commit_only(files, conf):
    daemon = FakeDaemon(files)
    failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert daemon.calls == [
        ("control", ("-c",), 60),
        ("control", ("-f",), 10),
        ("control", ("-R",), 10),
        ("control", ("-B",), 10),
    ]


def test_backup_ensures_the_daemon_then_shortens_timers_and_resyncs(files, conf):
    daemon = FakeDaemon(files)
    record = failover.run_transition("r1", Role.BACKUP, daemon, files, conf, 1000.0)
    assert daemon.calls == [("start", "other"), ("control", ("-t",), 10),
                            ("control", ("-n",), 10)]
    assert record.outcome == "done"
    assert record.commit is None


def test_backup_without_resync(files, make_conf, write_config):
    conf = make_conf(write_config("[failover]\nresync_on_backup = false\n"))
    daemon = FakeDaemon(files)
    failover.run_transition("r1", Role.BACKUP, daemon, files, conf, 1000.0)
    assert daemon.calls == [("start", "other"), ("control", ("-t",), 10)]


@pytest.mark.parametrize("role", [Role.FAULT, Role.STOP])
def test_fault_and_stop_only_shorten_timers(files, conf, role):
    daemon = FakeDaemon(files)
    failover.run_transition("r1", role, daemon, files, conf, 1000.0)
    assert daemon.calls == [("control", ("-t",), 10)]


def test_the_record_is_written_with_timings_and_commit_counts(files, conf):
    daemon = FakeDaemon(files, delay=0.02)
    before = time.time()
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, before)
    written = statedir.read_json(files.last_transition)
    assert written == record.to_dict()
    assert written["router"] == "r1"
    assert written["role"] == "primary"
    assert written["arrived"] == before
    assert before <= written["started"] <= written["finished"]
    assert written["outcome"] == "done"
    assert written["commit"] == LAST_COMMIT
    for step in written["steps"]:
        assert step["duration_ms"] >= 20
        assert before <= step["started"] <= written["finished"]
        assert step["ok"] is True and step["error"] is None
    assert [step["started"] for step in written["steps"]] == sorted(
        step["started"] for step in written["steps"])


def test_the_hook_commit_is_recorded_and_not_run_again(files, conf, fp):
    daemon = Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5)
    commands = [["conntrackd", "-C", str(files.conntrackd_config), flag]
                for flag in ("-f", "-R", "-B")]
    for command in commands:
        fp.register(command)
    hook_commit = HookCommit(1000.010, 1000.4725, 0)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf,
                                     1000.0, hook_commit)
    assert list(fp.calls) == commands
    commit = record.steps[0]
    assert (commit.name, commit.run_by, commit.ok) == ("commit", "notify-hook", True)
    assert commit.started == 1000.010
    assert commit.duration_ms == pytest.approx(462.5)
    assert [step.run_by for step in record.steps[1:]] == ["snat-sync"] * 3
    assert record.commit == LAST_COMMIT
    assert record.outcome == "done"


@pytest.mark.parametrize("status, error", [(124, "timed out"),
                                           (1, "conntrackd unreachable or lock "
                                               "timeout"),
                                           (2, "exit status 2")])
def test_a_failed_hook_commit_stops_the_plan(files, conf, status, error):
    daemon = FakeDaemon(files)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0,
                                     HookCommit(1000.0, 1001.0, status))
    assert daemon.calls == []
    assert record.outcome == "failed"
    assert record.errors == [f"commit: {error}"]
    assert statedir.read_json(files.last_transition)["outcome"] == "failed"


def test_a_failed_commit_is_not_followed_by_a_flush(files, conf, fp):
    """Flushing after a failed commit would throw the replicated entries away."""
    daemon = Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5)
    commit = ["conntrackd", "-C", str(files.conntrackd_config), "-c"]
    fp.register(commit, returncode=1, stderr="[ERROR] cannot connect to conntrackd\n")
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert list(fp.calls) == [commit]
    assert record.outcome == "failed"
    assert len(record.steps) == 1 and not record.steps[0].ok
    assert "cannot connect to conntrackd" in record.steps[0].error
    assert record.errors[0].startswith("commit: conntrackd -c failed (exit 1)")
    written = statedir.read_json(files.last_transition)
    assert written["outcome"] == "failed"
    assert [step["name"] for step in written["steps"]] == ["commit"]


def test_a_failed_step_stops_the_rest(files, conf):
    daemon = FakeDaemon(files, fail=("-R",))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert [call[1] for call in daemon.calls] == [("-c",), ("-f",), ("-R",)]
    assert [step.ok for step in record.steps] == [True, True, False]
    assert record.outcome == "failed"
    assert record.errors == ["resync-from-kernel: conntrackd -R failed (exit 1): "
                             "cannot connect"]


def test_an_older_transition_is_skipped_and_leaves_the_record_alone(files, conf):
    failover.run_transition("r1", Role.BACKUP, FakeDaemon(files), files, conf, 2000.0)
    before = files.last_transition.read_bytes()
    late = FakeDaemon(files)
    record = failover.run_transition("r1", Role.PRIMARY, late, files, conf, 1999.0)
    assert late.calls == []
    assert record.outcome == "superseded"
    assert record.steps == []
    assert files.last_transition.read_bytes() == before


def test_a_newer_transition_runs_and_replaces_the_record(files, conf):
    failover.run_transition("r1", Role.BACKUP, FakeDaemon(files), files, conf, 2000.0)
    daemon = FakeDaemon(files)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 2000.5)
    assert record.outcome == "done"
    assert len(daemon.calls) == 4
    assert statedir.read_json(files.last_transition)["role"] == "primary"


# -- the transition lock ------------------------------------------------------------


def test_transitions_of_one_router_run_one_at_a_time(files, conf):
    first_is_running = threading.Event()
    order = []
    first = FakeDaemon(files, delay=0.05,
                       on_control=lambda arguments: (order.append(("first", arguments)),
                                                     first_is_running.set()))
    second = FakeDaemon(files, on_control=lambda arguments: order.append(
        ("second", arguments)))
    records = {}

    def run(name, daemon, arrived):
        records[name] = failover.run_transition("r1", Role.PRIMARY, daemon, files,
                                                conf, arrived)

    thread = threading.Thread(target=run, args=("first", first, 1000.0))
    thread.start()
    assert first_is_running.wait(5)
    run("second", second, 1001.0)
    thread.join(5)
    assert [who for who, _arguments in order] == ["first"] * 4 + ["second"] * 4
    assert records["second"].started >= records["first"].finished
    assert records["second"].outcome == "done"


def test_a_held_lock_times_out(files):
    with failover.transition_lock(files.transition_lock, 1):
        started = time.monotonic()
        with pytest.raises(SnatSyncError) as caught:
            with failover.transition_lock(files.transition_lock, 0.1):
                pass
        assert 0.1 <= time.monotonic() - started < 2
    assert str(files.transition_lock) in str(caught.value)
    with failover.transition_lock(files.transition_lock, 0.1):
        pass  # released once its holder leaves


def test_a_transition_that_cannot_get_the_lock_runs_nothing(files):
    daemon = FakeDaemon(files)
    with failover.transition_lock(files.transition_lock, 1):
        with pytest.raises(SnatSyncError, match="another transition holds"):
            failover.run_transition("r1", Role.PRIMARY, daemon, files, fast_options(),
                                    1000.0)
    assert daemon.calls == []
    assert not files.last_transition.exists()


def test_the_lock_is_released_when_a_transition_raises(files):
    class Exploding(FakeDaemon):
        def control(self, *arguments, timeout=None, check=True):
            raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        failover.run_transition("r1", Role.FAULT, Exploding(files), files,
                                fast_options(), 1000.0)
    record = failover.run_transition("r1", Role.FAULT, FakeDaemon(files), files,
                                     fast_options(), 1001.0)
    assert record.outcome == "done"
