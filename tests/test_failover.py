"""The failover state machine: parsing keepalived's arguments, the plan for each
role, judging the commit, and running the plan under the router's lock."""

import threading
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snat_sync import connection_table
from snat_sync import failover
from snat_sync import history
from snat_sync import statedir
from snat_sync.conntrackd import (CacheStats, CommitResult, Conntrackd,
                                  ConntrackdError)
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.failover import HookStep, Role
from snat_sync.guard import GuardError

LOG_PREFIX = "[Tue Nov 24 20:13:56 2026] (pid=3092) [notice] "


def commit_log(*blocks):
    """A conntrackd log with one commit block per (committed, failed, seconds)."""
    lines = []
    for committed, failed, seconds in blocks:
        lines.append(f"{LOG_PREFIX}committing all external caches")
        lines.append(f"{LOG_PREFIX}Committed {committed} new entries")
        if failed:
            lines.append(f"{LOG_PREFIX}{failed} entries can't be committed")
        lines.append(f"{LOG_PREFIX}commit has taken {seconds} seconds")
    return "\n".join(lines) + "\n"


# an earlier, small commit, then the one of this failover: 100000 entries, all in
COMMIT_LOG = commit_log((3, 0, "0.000010"), (100000, 0, "0.461250"))
LAST_COMMIT = {"committed": 100000, "already_present": 0, "failed": 0,
               "seconds": 0.46125, "expected": 100000}
EXTERNAL_100000 = CacheStats(internal_active=0, external_active=100000,
                             internal_no_space=0, external_no_space=0)
SKIPPED_FLUSH = ("flush-caches: skipped: it would discard the entries the commit "
                 "left out")


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


def cold_plan(role, **settings):
    return failover.plan(role, failover.COLD, **settings)


def test_plan_primary():
    steps = cold_plan(Role.PRIMARY)
    assert names(steps) == ["commit", "lift-guard", "flush-caches",
                            "resync-from-kernel", "bulk-send"]
    assert [step.action for step in steps] == [
        "control", "lift-guard", "control", "control", "control"]
    assert [step.arguments for step in steps] == [("-c",), (), ("-f",), ("-R",),
                                                  ("-B",)]
    assert [step.timeout_option for step in steps] == [
        "commit_timeout", "control_timeout", "control_timeout", "table_timeout",
        "table_timeout"]
    assert cold_plan(Role.PRIMARY, resync_on_backup=False) == steps


def test_only_the_flush_discards_replicated_entries():
    every_step = {step for role in Role for step in cold_plan(role)}
    assert {step.name for step in every_step
            if step.discards_replicated_entries} == {"flush-caches"}


def test_plan_primary_without_guard():
    assert names(cold_plan(Role.PRIMARY, guard=False)) == [
        "commit", "flush-caches", "resync-from-kernel", "bulk-send"]


def test_plan_backup():
    steps = cold_plan(Role.BACKUP)
    assert names(steps) == ["ensure-running", "raise-guard", "shorten-timers",
                            "request-resync"]
    assert [step.action for step in steps] == [
        "start-daemon", "raise-guard", "control", "request-table"]
    assert [step.arguments for step in steps[2:]] == [("-t",), ("-n",)]
    assert {step.timeout_option for step in steps} == {"control_timeout"}


def test_plan_backup_without_resync():
    assert names(cold_plan(Role.BACKUP, resync_on_backup=False)) == [
        "ensure-running", "raise-guard", "shorten-timers"]


def test_plan_backup_without_guard():
    assert names(cold_plan(Role.BACKUP, guard=False)) == [
        "ensure-running", "shorten-timers", "request-resync"]


@pytest.mark.parametrize("role", [Role.FAULT, Role.STOP])
def test_plan_fault_and_stop(role):
    assert names(cold_plan(role)) == ["raise-guard", "shorten-timers"]
    assert names(cold_plan(role, guard=False)) == ["shorten-timers"]
    assert cold_plan(role, resync_on_backup=False) == cold_plan(role)


@pytest.mark.parametrize("latest, arrived, superseded", [
    (None, 100.0, False),
    (50.0, 100.0, False),
    (100.0, 100.0, False),
    (100.5, 100.0, True),
])
def test_is_superseded(latest, arrived, superseded):
    latest = None if latest is None else statedir.LatestArrival(latest)
    assert failover.is_superseded(latest, arrived) is superseded


def test_hook_step_parse():
    assert HookStep.parse("commit,1700000000.25,1700000000.75,0") == HookStep(
        "commit", 1700000000.25, 1700000000.75, 0)
    assert HookStep.parse("lift-guard,1.5,2,1") == HookStep("lift-guard", 1.5, 2.0, 1)


def test_hook_step_parse_with_the_log_offset_of_the_commit():
    assert HookStep.parse("commit,1700000000.25,1700000000.75,0,4096") == HookStep(
        "commit", 1700000000.25, 1700000000.75, 0, log_offset=4096)
    assert HookStep.parse("commit,1.5,2,0,0").log_offset == 0
    assert HookStep.parse("commit,1.5,2,0").log_offset is None


@pytest.mark.parametrize("offset", ["", "-1", "x", "1.5", " 7", "²", "0x10",
                                    str(2**63), "1" * 20])
def test_hook_step_parse_rejects_a_bad_log_offset(offset):
    text = f"commit,1.0,2.0,0,{offset}"
    with pytest.raises(InvalidInput, match="hook step") as caught:
        HookStep.parse(text)
    assert caught.value.exit_status == 2
    assert caught.value.value == text
    assert f"log offset {offset!r}" in str(caught.value)


def test_hook_step_parse_refuses_a_log_offset_on_another_step():
    with pytest.raises(InvalidInput, match="only the commit step has a log offset"):
        HookStep.parse("forget-own-entries,1.0,2.0,0,10")


@pytest.mark.parametrize("bad", ["", "commit", "commit,1,2", "commit,1,2,3,4,5",
                                 "1700000000.25,1700000000.75,0", "commit,a,b,0",
                                 "commit,1.0,2.0,x", "commit,1.0,2.0,0.5"])
def test_hook_step_parse_rejects(bad):
    with pytest.raises(InvalidInput, match="hook step") as caught:
        HookStep.parse(bad)
    assert caught.value.exit_status == 2


# -- commit_problems ----------------------------------------------------------------


def test_commit_problems_of_a_complete_commit():
    assert failover.commit_problems(CommitResult(100, 0, 0, 0.1), 100) == []
    assert failover.commit_problems(CommitResult(60, 40, 0, 0.1), 100) == []
    assert failover.commit_problems(CommitResult(0, 0, 0, 0.0), 0) == []


def test_commit_problems_when_no_commit_was_logged():
    assert failover.commit_problems(None, 100) == ["conntrackd logged no commit"]
    assert failover.commit_problems(None, None) == ["conntrackd logged no commit"]


def test_commit_problems_of_entries_that_could_not_be_committed():
    assert failover.commit_problems(CommitResult(93, 0, 7, 0.1), 100) == [
        "7 of 100 entries could not be committed"]


def test_commit_problems_of_entries_the_commit_left_out():
    assert failover.commit_problems(CommitResult(90, 5, 0, 0.1), 100) == [
        "only 95 of 100 replicated entries were accounted for by the commit"]
    assert failover.commit_problems(CommitResult(99, 0, 0, 0.1), 100) == [
        "only 99 of 100 replicated entries were accounted for by the commit"]


def test_commit_problems_of_a_commit_that_never_finished():
    """"committing all external caches" logged, but no count: nothing accounted."""
    assert failover.commit_problems(CommitResult(None, 0, 0, None), 100) == [
        "only 0 of 100 replicated entries were accounted for by the commit"]


def test_commit_problems_reports_failures_and_shortfall_together():
    assert failover.commit_problems(CommitResult(80, 0, 7, 0.1), 100) == [
        "7 of 100 entries could not be committed",
        "only 87 of 100 replicated entries were accounted for by the commit"]


def test_commit_problems_without_a_cache_size_judges_the_log_only():
    assert failover.commit_problems(CommitResult(5, 0, 0, 0.1), None) == []
    problems = failover.commit_problems(CommitResult(5, 0, 2, 0.1), None)
    assert len(problems) == 1
    assert problems[0].startswith("2 of ") and "could not be committed" in problems[0]


def test_more_accounted_than_expected_is_fine():
    """Entries added to the kernel table meanwhile are no problem."""
    assert failover.commit_problems(CommitResult(120, 0, 0, 0.1), 100) == []


# -- run_transition -----------------------------------------------------------------


class Journal(list):
    """What a transition asked of conntrackd and of the guard, in order."""

    def __init__(self):
        super().__init__()
        self.guard_error = {}


class FakeDaemon:
    """Records what a transition asks of conntrackd; fails or stalls on request.

    Its `-c` appends commit_log to conntrackd.log, as the real one logs its commit
    block (unless the -c fails: it never reached conntrackd).
    """

    namespace = "qrouter-r1"

    def __init__(self, files, journal=None, fail=(), delay=0.0, on_control=None,
                 stats=EXTERNAL_100000, commit_log=COMMIT_LOG):
        self.files = files
        self.commit_log = commit_log
        self.calls = Journal() if journal is None else journal
        self.fail = fail
        self.delay = delay
        self.on_control = on_control
        self.stats = stats
        self.cache_stats_calls = 0

    def start(self, scheduler_policy="other"):
        self.calls.append(("start", scheduler_policy))
        return False

    def run_as(self, role, scheduler_policy="other"):
        """As if conntrackd had to be restarted with role's configuration."""
        self.calls.append(("run-as", role.value, scheduler_policy))
        return self.restarts_as == role

    restarts_as = None

    def control(self, *arguments, timeout=None, check=True):
        self.calls.append(("control", arguments, timeout))
        if self.on_control:
            self.on_control(arguments)
        time.sleep(self.delay)
        if arguments[0] in self.fail:
            raise ConntrackdError(f"conntrackd {' '.join(arguments)} failed (exit 1): "
                                  "cannot connect")
        if arguments[0] == "-c":
            with open(self.files.log_file, "a") as log:
                log.write(self.commit_log)

    def cache_stats(self, timeout=None):
        self.cache_stats_calls += 1
        return self.stats


@pytest.fixture
def journal(monkeypatch):
    """Fake the guard: raising and lifting are recorded in the journal."""
    calls = Journal()

    def fake(action):
        def run(namespace, files):
            calls.append((action, namespace))
            if action in calls.guard_error:
                raise GuardError(calls.guard_error[action])
        return run

    monkeypatch.setattr(failover.guard, "raise_guard", fake("raise-guard"))
    monkeypatch.setattr(failover.guard, "lift_guard", fake("lift-guard"))
    monkeypatch.setattr(failover.connection_table, "flush", lambda namespace, timeout:
                        calls.append(("flush-kernel-table", namespace)))
    return calls


@pytest.fixture
def daemon(files, journal):
    return FakeDaemon(files, journal)


@pytest.fixture
def files(router_files):
    router_files.log_file.write_text(COMMIT_LOG)
    return router_files


def fast_options(lock_timeout=0.2, resync_on_backup=True, reset_window_guard=True,
                 standby_mode="cold", demote_while_resyncing=False,
                 table_transfer=False):
    """Options as run_transition reads them, with a lock timeout below oslo's 1 s.

    Cold standby unless asked: most tests here are about the commit and the guard.
    Without the daemon's table transfer: the resync is conntrackd's -n.
    """
    return types.SimpleNamespace(
        failover=types.SimpleNamespace(lock_timeout=lock_timeout,
                                       resync_on_backup=resync_on_backup,
                                       reset_window_guard=reset_window_guard,
                                       standby_mode=standby_mode,
                                       history_size=200,
                                       demote_while_resyncing=demote_while_resyncing,
                                       table_transfer=table_transfer),
        conntrackd=types.SimpleNamespace(commit_timeout=60, control_timeout=10,
                                         table_timeout=60,
                                         scheduler="other"),
    )


@pytest.fixture
def conf(cold_conf):
    """The real options, with cold standby: the commit and the guard under test."""
    return cold_conf


def conntrackd_command(files, *arguments):
    return ["conntrackd", "-C", str(files.conntrackd_config), *arguments]


def register_commands(fp, files, commands, commit_log=COMMIT_LOG):
    """Fake the processes; conntrackd -c logs commit_log, as the real one logs its
    commit block."""

    def log_commit(process):
        with open(files.log_file, "a") as log:
            log.write(commit_log)

    for command in commands:
        if command == conntrackd_command(files, "-c"):
            fp.register(command, callback=log_commit)
        else:
            fp.register(command)


def cache_stats_output(external, external_no_space=0):
    return (f"cache:internal\tactive objects:\t\t{0:12d}\n"
            f"\t\tno space left in cache:\t{0:12d}\n\n"
            f"cache:external\tactive objects:\t\t{external:12d}\n"
            f"\t\tno space left in cache:\t{external_no_space:12d}\n")


def test_primary_runs_the_exact_commands_in_order(files, conf, fp, monkeypatch):
    """The real Conntrackd and guard; only the processes (and the statistics on
    conntrackd's control socket) are faked."""
    monkeypatch.setattr("snat_sync.conntrackd.query_stats",
                        lambda path, kind, timeout: cache_stats_output(100000))
    daemon = Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5, 60)
    lift = ["nsenter", "--net=/run/netns/qrouter-r1", "nft", "-f",
            str(files.guard_lift)]
    commands = [conntrackd_command(files, "-c"),
                lift,
                conntrackd_command(files, "-f"),
                conntrackd_command(files, "-R"),
                conntrackd_command(files, "-B")]
    register_commands(fp, files, commands)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert list(fp.calls) == commands
    assert record.outcome == "done"
    assert record.errors == []
    assert [step.name for step in record.steps] == [
        "commit", "lift-guard", "flush-caches", "resync-from-kernel", "bulk-send"]
    assert all(step.ok and step.run_by == "snat-sync" for step in record.steps)
    assert record.commit == LAST_COMMIT


def test_backup_runs_the_exact_commands_in_order(files, conf, fp):
    daemon_start = []
    raise_ = ["nsenter", "--net=/run/netns/qrouter-r1", "nft", "-f",
              str(files.guard_raise)]
    commands = [raise_, conntrackd_command(files, "-t"), conntrackd_command(files, "-n")]
    for command in commands:
        fp.register(command)
    # starting the daemon is Conntrackd.start's business (tested on its own)
    daemon = type("Started", (Conntrackd,), {
        "start": lambda self, policy="other": daemon_start.append(policy)})(
        "conntrackd", "qrouter-r1", files, 10, 10, 5, 60)
    record = failover.run_transition("r1", Role.BACKUP, daemon, files, conf, 1000.0)
    assert daemon_start == ["other"]
    assert list(fp.calls) == commands
    assert record.outcome == "done"
    assert [step.name for step in record.steps] == [
        "ensure-running", "raise-guard", "shorten-timers", "request-resync"]


def test_primary_bounds_the_commit_and_the_table_walks_by_their_own_timeouts(
        files, make_conf, write_config, daemon):
    """At 1,000,000 entries -R took 8.4 s and -B over 10 s: the control timeout
    would fail a transition whose commit had succeeded."""
    conf = make_conf(write_config("[failover]\nstandby_mode = cold\n"
                                  "[conntrackd]\ncommit_timeout = 90\n"
                                  "table_timeout = 45\ncontrol_timeout = 7\n"))
    failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert daemon.calls == [
        ("control", ("-c",), 90),
        ("lift-guard", "qrouter-r1"),
        ("control", ("-f",), 7),
        ("control", ("-R",), 45),
        ("control", ("-B",), 45),
    ]
    assert daemon.cache_stats_calls == 1


def test_primary_without_guard_never_touches_it(files, make_conf, write_config,
                                               daemon):
    conf = make_conf(write_config("[failover]\nstandby_mode = cold\nreset_window_guard = false\n"))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert [call[1] for call in daemon.calls] == [("-c",), ("-f",), ("-R",), ("-B",)]
    assert record.outcome == "done"


def test_backup_ensures_the_daemon_raises_the_guard_then_shortens_and_resyncs(
        files, conf, daemon):
    record = failover.run_transition("r1", Role.BACKUP, daemon, files, conf, 1000.0)
    assert daemon.calls == [("start", "other"), ("raise-guard", "qrouter-r1"),
                            ("control", ("-t",), 10), ("control", ("-n",), 10)]
    assert record.outcome == "done"
    assert record.commit is None
    assert daemon.cache_stats_calls == 0


def test_backup_without_resync(files, make_conf, write_config, daemon):
    conf = make_conf(write_config("[failover]\nstandby_mode = cold\nresync_on_backup = false\n"))
    failover.run_transition("r1", Role.BACKUP, daemon, files, conf, 1000.0)
    assert daemon.calls == [("start", "other"), ("raise-guard", "qrouter-r1"),
                            ("control", ("-t",), 10)]


def test_backup_without_guard(files, make_conf, write_config, daemon):
    conf = make_conf(write_config("[failover]\nstandby_mode = cold\nreset_window_guard = false\n"))
    failover.run_transition("r1", Role.BACKUP, daemon, files, conf, 1000.0)
    assert daemon.calls == [("start", "other"), ("control", ("-t",), 10),
                            ("control", ("-n",), 10)]


@pytest.mark.parametrize("role", [Role.FAULT, Role.STOP])
def test_fault_and_stop_raise_the_guard_and_shorten_timers(files, conf, role, daemon):
    record = failover.run_transition("r1", role, daemon, files, conf, 1000.0)
    assert daemon.calls == [("raise-guard", "qrouter-r1"), ("control", ("-t",), 10)]
    assert record.outcome == "done"


def test_the_record_is_written_with_timings_and_commit_counts(files, conf, journal):
    daemon = FakeDaemon(files, journal, delay=0.02)
    before = round(time.time(), 6)  # arrivals are kept to the microsecond
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, before)
    written = statedir.read_json(files.last_transition)
    assert written == record.to_dict()
    assert written["router"] == "r1"
    assert written["role"] == "primary"
    assert written["arrived"] == before
    assert before <= written["started"] <= written["finished"]
    assert written["outcome"] == "done"
    assert written["errors"] == []
    assert written["commit"] == LAST_COMMIT
    for step in written["steps"]:
        if step["name"] != "lift-guard":  # the fake guard does not sleep
            assert step["duration_ms"] >= 20
        assert before <= step["started"] <= written["finished"]
        assert step["ok"] is True and step["error"] is None
    assert [step["started"] for step in written["steps"]] == sorted(
        step["started"] for step in written["steps"])


def test_the_hook_steps_are_recorded_and_not_run_again(files, conf, fp,
                                                       monkeypatch):
    monkeypatch.setattr("snat_sync.conntrackd.query_stats",
                        lambda path, kind, timeout: cache_stats_output(100000))
    daemon = Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5, 60)
    commands = [conntrackd_command(files, "-f"),
                conntrackd_command(files, "-R"),
                conntrackd_command(files, "-B")]
    for command in commands:
        fp.register(command)
    hook_steps = [HookStep("commit", 1000.010, 1000.4725, 0),
                  HookStep("lift-guard", 1000.4730, 1000.4790, 0)]
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf,
                                     1000.0, hook_steps)
    assert list(fp.calls) == commands  # no -c, no nsenter
    commit, lift = record.steps[:2]
    assert (commit.name, commit.run_by, commit.ok) == ("commit", "notify-hook", True)
    assert commit.started == 1000.010
    assert commit.duration_ms == pytest.approx(462.5)
    assert (lift.name, lift.run_by, lift.ok) == ("lift-guard", "notify-hook", True)
    assert lift.duration_ms == pytest.approx(6.0)
    assert [step.run_by for step in record.steps[2:]] == ["snat-sync"] * 3
    assert record.commit == LAST_COMMIT  # the hook's commit is still accounted
    assert record.outcome == "done"


def test_a_hook_step_the_plan_does_not_have_is_ignored(files, conf, daemon):
    record = failover.run_transition(
        "r1", Role.BACKUP, daemon, files, conf, 1000.0,
        [HookStep("commit", 1000.0, 1000.1, 0), HookStep("bogus", 1.0, 2.0, 0)])
    assert [step.name for step in record.steps] == [
        "ensure-running", "raise-guard", "shorten-timers", "request-resync"]
    assert all(step.run_by == "snat-sync" for step in record.steps)
    assert record.commit is None


def test_only_the_lift_from_the_hook_runs_the_commit_here(files, conf, daemon):
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0,
                                     [HookStep("lift-guard", 1000.0, 1000.001, 0)])
    assert daemon.calls[0] == ("control", ("-c",), 60)
    assert ("lift-guard", "qrouter-r1") not in daemon.calls
    assert [step.run_by for step in record.steps[:2]] == ["snat-sync", "notify-hook"]


@pytest.mark.parametrize("status, error", [
    (124, "timed out"),
    (1, "failed, or the transition lock timed out"),
    (2, "exit status 2"),
])
def test_a_failed_hook_commit_skips_only_the_flush(files, conf, daemon, status,
                                                   error):
    record = failover.run_transition(
        "r1", Role.PRIMARY, daemon, files, conf, 1000.0,
        [HookStep("commit", 1000.0, 1001.0, status),
         HookStep("lift-guard", 1001.0, 1001.01, 0)])
    assert daemon.calls == [("control", ("-R",), 60), ("control", ("-B",), 60)]
    assert [(step.name, step.ok) for step in record.steps] == [
        ("commit", False), ("lift-guard", True), ("flush-caches", False),
        ("resync-from-kernel", True), ("bulk-send", True)]
    assert record.outcome == "failed"
    assert record.errors == [f"commit: {error}", SKIPPED_FLUSH]
    assert statedir.read_json(files.last_transition)["outcome"] == "failed"


def test_a_failed_commit_skips_only_the_flush_and_still_lifts_the_guard(
        files, conf, fp):
    """Flushing after a failed commit would throw the replicated entries away;
    keeping the guard up would drop every new connection of the new primary."""
    daemon = Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5, 60)
    commit = conntrackd_command(files, "-c")
    fp.register(commit, returncode=1, stderr="[ERROR] cannot connect to conntrackd\n")
    lift = ["nsenter", "--net=/run/netns/qrouter-r1", "nft", "-f",
            str(files.guard_lift)]
    fp.register(lift)
    rest = [conntrackd_command(files, flag) for flag in ("-R", "-B")]
    for command in rest:
        fp.register(command)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert list(fp.calls) == [commit, lift, *rest]  # no control socket: no stats
    assert record.outcome == "failed"
    assert [(step.name, step.ok) for step in record.steps] == [
        ("commit", False), ("lift-guard", True), ("flush-caches", False),
        ("resync-from-kernel", True), ("bulk-send", True)]
    assert "cannot connect to conntrackd" in record.steps[0].error
    assert record.steps[2].error.startswith("skipped")
    assert record.errors[0].startswith("commit: conntrackd -c failed (exit 1)")
    assert record.errors[1:] == [SKIPPED_FLUSH]
    written = statedir.read_json(files.last_transition)
    assert written["outcome"] == "failed"
    assert [step["name"] for step in written["steps"]] == [
        "commit", "lift-guard", "flush-caches", "resync-from-kernel", "bulk-send"]


def test_a_commit_that_never_ran_records_no_counts_of_an_earlier_one(files, conf,
                                                                    journal):
    daemon = FakeDaemon(files, journal, fail=("-c",))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert record.commit is None or record.commit.get("committed") is None


def test_a_commit_that_logs_its_block_is_read_from_its_own_block(files, conf,
                                                                journal):
    """The log holds an earlier failover's commit; this commit appends its own."""
    files.log_file.write_text(commit_log((100000, 0, "0.461250")))
    daemon = FakeDaemon(files, journal,
                        commit_log=commit_log((99993, 7, "0.100000")))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert record.commit == {"committed": 99993, "already_present": 0, "failed": 7,
                             "seconds": 0.1, "expected": 100000}
    assert record.errors[0] == "commit: 7 of 100000 entries could not be committed"


def test_a_commit_that_logs_nothing_is_not_credited_with_an_earlier_block(
        files, conf, journal):
    """An earlier commit's block is in the log; this commit (exit 0) writes none.

    Its counts must not be the earlier block's: nothing proves this commit put
    any entry in, so the transition must say that no commit was logged.
    """
    files.log_file.write_text(commit_log((100000, 0, "0.461250")))
    daemon = FakeDaemon(files, journal, commit_log="")
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert record.steps[0].ok  # conntrackd -c itself exited 0
    assert (record.commit or {}).get("committed") is None, record.commit
    assert "commit: conntrackd logged no commit" in record.errors, record.errors
    assert record.outcome == "failed"

def test_a_hook_commit_that_logged_nothing_since_its_offset_is_not_credited(
        files, conf, journal):
    """The hook measured the log before its commit; an older block lies before that
    offset, and nothing came after it."""
    offset = files.log_file.stat().st_size
    daemon = FakeDaemon(files, journal)
    record = failover.run_transition(
        "r1", Role.PRIMARY, daemon, files, conf, 1000.0,
        [HookStep("commit", 1000.1, 1000.3, 0, log_offset=offset)])
    assert ("control", ("-c",), 60) not in daemon.calls
    assert record.steps[0].ok and record.steps[0].run_by == "notify-hook"
    assert record.commit == {"expected": 100000}
    assert record.errors == ["commit: conntrackd logged no commit", SKIPPED_FLUSH]
    assert record.outcome == "failed"


def test_a_hook_commit_is_read_from_the_block_after_its_offset(files, conf,
                                                               journal):
    offset = files.log_file.stat().st_size
    with open(files.log_file, "a") as log:
        log.write(commit_log((99993, 7, "0.100000")))
    record = failover.run_transition(
        "r1", Role.PRIMARY, FakeDaemon(files, journal), files, conf, 1000.0,
        [HookStep("commit", 1000.1, 1000.3, 0, log_offset=offset)])
    assert record.commit == {"committed": 99993, "already_present": 0, "failed": 7,
                             "seconds": 0.1, "expected": 100000}


def test_a_hook_commit_after_the_log_was_rotated_reads_the_whole_log(files, conf,
                                                                     journal):
    """Copy-and-truncate emptied the log after the hook measured it: the file, now
    shorter than the offset, is all new."""
    offset = files.log_file.stat().st_size
    files.log_file.write_text(commit_log((99993, 7, "0.100000")))
    assert files.log_file.stat().st_size < offset
    record = failover.run_transition(
        "r1", Role.PRIMARY, FakeDaemon(files, journal), files, conf, 1000.0,
        [HookStep("commit", 1000.1, 1000.3, 0, log_offset=offset)])
    assert record.commit["committed"] == 99993


def test_a_commit_during_a_log_rotation_reads_the_whole_log(files, conf, journal):
    """The daemon truncates the log while conntrackd -c runs, which then logs its
    block into the emptied file."""
    def rotate(arguments):
        if arguments[0] == "-c":
            files.log_file.write_text("")

    before = files.log_file.stat().st_size
    daemon = FakeDaemon(files, journal, on_control=rotate,
                        commit_log=commit_log((99993, 7, "0.100000")))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert files.log_file.stat().st_size < before
    assert record.commit["committed"] == 99993


def test_a_commit_without_a_log_file_reads_what_it_logs(files, conf, journal):
    files.log_file.unlink()
    record = failover.run_transition("r1", Role.PRIMARY, FakeDaemon(files, journal),
                                     files, conf, 1000.0)
    assert record.commit == LAST_COMMIT
    assert record.outcome == "done"


def run_primary_with_log(files, conf, daemon, log):
    """The commit logs log (after the earlier commits the files fixture wrote)."""
    daemon.commit_log = log
    return failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)


def test_entries_that_could_not_be_committed_skip_the_flush(files, conf, daemon):
    record = run_primary_with_log(files, conf, daemon,
                                  commit_log((99993, 7, "0.461250")))
    assert [call[1] for call in daemon.calls] == [("-c",), "qrouter-r1", ("-R",),
                                                  ("-B",)]
    assert record.steps[0].ok  # conntrackd -c itself exited 0
    assert record.commit == {"committed": 99993, "already_present": 0, "failed": 7,
                             "seconds": 0.46125, "expected": 100000}
    assert record.errors == ["commit: 7 of 100000 entries could not be committed",
                             SKIPPED_FLUSH]
    assert record.outcome == "failed"


def test_a_commit_that_left_entries_out_skips_the_flush(files, conf, daemon):
    record = run_primary_with_log(files, conf, daemon,
                                  commit_log((90000, 0, "0.400000")))
    assert ("control", ("-f",), 10) not in daemon.calls
    assert record.errors == [
        "commit: only 90000 of 100000 replicated entries were accounted for by the "
        "commit", SKIPPED_FLUSH]
    assert record.outcome == "failed"


def test_a_commit_that_was_not_logged_skips_the_flush(files, conf, daemon):
    record = run_primary_with_log(files, conf, daemon,
                                  f"{LOG_PREFIX}-- starting in daemon mode --\n")
    assert ("control", ("-f",), 10) not in daemon.calls
    assert record.commit == {"expected": 100000}
    assert record.errors == ["commit: conntrackd logged no commit", SKIPPED_FLUSH]


def test_a_full_external_cache_is_an_error_and_skips_the_flush(files, conf, journal):
    daemon = FakeDaemon(files, journal, stats=CacheStats(0, 100000, 0, 69000))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert ("control", ("-f",), 10) not in daemon.calls
    assert ("lift-guard", "qrouter-r1") in daemon.calls
    assert record.errors == [
        "commit: the external cache was full: 69000 replicated entries were dropped "
        "before the failover", SKIPPED_FLUSH]
    assert record.outcome == "failed"


def test_a_full_internal_cache_is_not_the_commits_problem(files, conf, journal):
    daemon = FakeDaemon(files, journal, stats=CacheStats(0, 100000, 500, 0))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert record.outcome == "done"
    assert ("control", ("-f",), 10) in daemon.calls


def test_a_daemon_without_cache_stats_is_judged_by_the_log_alone(files, conf,
                                                                  journal):
    daemon = FakeDaemon(files, journal, stats=None)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert record.commit == {**LAST_COMMIT, "expected": None}
    assert record.outcome == "done"
    assert ("control", ("-f",), 10) in daemon.calls


def test_a_failed_step_does_not_stop_the_rest(files, conf, journal):
    daemon = FakeDaemon(files, journal, fail=("-R",))
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert [call[1] for call in daemon.calls] == [("-c",), "qrouter-r1", ("-f",),
                                                  ("-R",), ("-B",)]
    assert [step.ok for step in record.steps] == [True, True, True, False, True]
    assert record.outcome == "failed"
    assert record.errors == ["resync-from-kernel: conntrackd -R failed (exit 1): "
                             "cannot connect"]


def test_a_failed_lift_is_recorded_and_the_rest_still_runs(files, conf, daemon,
                                                           journal):
    journal.guard_error["lift-guard"] = "nft -f guard-lift.nft failed in namespace " \
                                        "qrouter-r1: no such table"
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 1000.0)
    assert [call[1] for call in daemon.calls] == [("-c",), "qrouter-r1", ("-f",),
                                                  ("-R",), ("-B",)]
    assert record.errors == ["lift-guard: nft -f guard-lift.nft failed in namespace "
                             "qrouter-r1: no such table"]
    assert record.outcome == "failed"


def test_a_failed_raise_is_recorded_and_the_backup_still_resyncs(files, conf, daemon,
                                                                 journal):
    journal.guard_error["raise-guard"] = "cannot run nft: no nsenter"
    record = failover.run_transition("r1", Role.BACKUP, daemon, files, conf, 1000.0)
    assert daemon.calls[-2:] == [("control", ("-t",), 10), ("control", ("-n",), 10)]
    assert record.errors == ["raise-guard: cannot run nft: no nsenter"]
    assert record.outcome == "failed"


def test_an_older_transition_is_skipped_and_leaves_the_record_alone(files, conf,
                                                                   journal):
    failover.run_transition("r1", Role.BACKUP, FakeDaemon(files, journal), files, conf,
                            2000.0)
    before = files.last_transition.read_bytes()
    journal.clear()
    late = FakeDaemon(files, journal)
    record = failover.run_transition("r1", Role.PRIMARY, late, files, conf, 1999.0)
    assert late.calls == []  # neither conntrackd nor the guard
    assert late.cache_stats_calls == 0
    assert record.outcome == "superseded"
    assert record.steps == []
    assert files.last_transition.read_bytes() == before
    assert [(entry["role"], entry["outcome"]) for entry in history.read_history(files)] \
        == [("backup", "done"), ("primary", "superseded")]


def test_a_newer_transition_runs_and_replaces_the_record(files, conf, journal):
    failover.run_transition("r1", Role.BACKUP, FakeDaemon(files, journal), files,
                            conf, 2000.0)
    journal.clear()
    daemon = FakeDaemon(files, journal)
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files, conf, 2000.5)
    assert record.outcome == "done"
    assert len(daemon.calls) == 5
    assert statedir.read_json(files.last_transition)["role"] == "primary"


# -- the transition lock ------------------------------------------------------------


def test_transitions_of_one_router_run_one_at_a_time(files, conf, journal):
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
    assert not files.history.exists()


def test_the_lock_is_released_when_a_transition_raises(files, journal):
    class Exploding(FakeDaemon):
        def control(self, *arguments, timeout=None, check=True):
            raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        failover.run_transition("r1", Role.FAULT, Exploding(files), files,
                                fast_options(), 1000.0)
    record = failover.run_transition("r1", Role.FAULT, FakeDaemon(files), files,
                                     fast_options(), 1001.0)
    assert record.outcome == "done"


@pytest.mark.parametrize("role, expected", [
    (Role.PRIMARY, ["run-as-primary", "resync-from-kernel"]),
    (Role.BACKUP, ["run-as-backup", "forget-own-entries", "flush-kernel-table",
                   "request-resync"]),
    (Role.FAULT, ["forget-own-entries"]),
    (Role.STOP, ["forget-own-entries"]),
])
def test_warm_plan_neither_commits_guards_nor_purges(role, expected):
    steps = failover.plan(role, failover.WARM, resync_on_backup=True, guard=True)
    assert names(steps) == expected
    assert failover.plan(role) == steps  # warm is the default
    assert not {"commit", "lift-guard", "raise-guard", "shorten-timers",
                "flush-caches"} & set(names(steps))


def test_a_warm_primary_with_other_backups_reads_its_table_again_and_sends_it():
    """Another backup lives on and asks for nothing: entries created while the
    restart into the primary's configuration read no events must reach it."""
    steps = failover.plan(Role.PRIMARY, failover.WARM, other_backups=True)
    assert names(steps) == ["run-as-primary", "resync-from-kernel", "bulk-send"]
    assert not steps[1].redundant_after_start  # a fresh start does not skip it
    assert failover.plan(Role.PRIMARY, failover.WARM)[1].redundant_after_start
    assert names(failover.plan(Role.BACKUP, failover.WARM, other_backups=True)) == \
        names(failover.plan(Role.BACKUP, failover.WARM))


def test_warm_backup_forgets_its_own_entries_before_it_empties_the_kernel():
    """Entries in conntrackd's own cache whose kernel copies the flush deletes would
    be reported to the primary as ended, and deleted there: forget them first."""
    steps = failover.plan(Role.BACKUP, failover.WARM)
    assert [step.arguments for step in steps[1:]] == [("-f", "internal"), (),
                                                      ("-n",)]
    assert steps[2].action == "flush-kernel-table"
    assert not any(step.discards_replicated_entries for step in steps)


def test_warm_backup_without_resync_keeps_its_table():
    """Emptied and never refilled, the replica would stay empty."""
    steps = failover.plan(Role.BACKUP, failover.WARM, resync_on_backup=False)
    assert names(steps) == ["run-as-backup", "forget-own-entries"]


def test_a_warm_primary_restarted_with_its_configuration_reads_no_table_twice(
        files, daemon):
    """conntrackd restarted with the primary's configuration has read the kernel's
    table at its start; -R would read all of it again."""
    daemon.restarts_as = Role.PRIMARY
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files,
                                     fast_options(standby_mode="warm"), 1000.0)
    assert record.outcome == "done", record.errors
    assert daemon.calls == [("run-as", "primary", "other")]
    assert [(step.name, step.started_conntrackd, step.skipped is not None)
            for step in record.steps] == [("run-as-primary", True, False),
                                          ("resync-from-kernel", False, True)]


def test_a_warm_primary_already_running_its_configuration_reads_the_table(
        files, daemon):
    record = failover.run_transition("r1", Role.PRIMARY, daemon, files,
                                     fast_options(standby_mode="warm"), 1000.0)
    assert record.outcome == "done", record.errors
    assert daemon.calls == [("run-as", "primary", "other"), ("control", ("-R",), 60)]


def test_warm_backup_runs_the_exact_commands_in_order(files, fp, monkeypatch):
    """The flush of the kernel table is conntrack -F for both families, inside the
    router's namespace, between forgetting the own entries and asking for the table."""
    monkeypatch.setattr(Conntrackd, "run_as", lambda self, role, scheduler="other": False)
    order = [conntrackd_command(files, "-f", "internal"),
             *connection_table.flush_commands("qrouter-r1"),
             conntrackd_command(files, "-n")]
    for command in order:
        fp.register(command)
    options = fast_options(standby_mode="warm")
    record = failover.run_transition("r1", Role.BACKUP, Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5, 60), files,
                                     options, 3000.0)
    assert record.outcome == "done", record.errors
    assert list(fp.calls) == order
    assert order[1][:2] == ["nsenter", "--net=/run/netns/qrouter-r1"]
    assert order[1][2:] == ["conntrack", "-F", "-f", "ipv4"]


def test_warm_hook_forget_is_recorded_and_not_run_again(files, daemon):
    record = failover.run_transition(
        "r1", Role.BACKUP, daemon, files, fast_options(standby_mode="warm"), 1000.0,
        [HookStep("forget-own-entries", 1000.1, 1000.104, 0)])
    assert record.outcome == "done"
    assert [(step.name, step.run_by) for step in record.steps][:2] == [
        ("run-as-backup", "snat-sync"), ("forget-own-entries", "notify-hook")]
    assert ("control", ("-f", "internal"), 10) not in daemon.calls


def test_a_failed_hook_forget_is_run_again_once_conntrackd_runs(files, daemon):
    """The hook forgets first thing, before anything made sure conntrackd runs."""
    record = failover.run_transition(
        "r1", Role.BACKUP, daemon, files, fast_options(standby_mode="warm"), 1000.0,
        [HookStep("forget-own-entries", 1000.1, 1000.104, 1)])
    assert record.outcome == "done", record.errors
    assert record.steps[1].run_by == "snat-sync" and record.steps[1].ok
    assert daemon.calls == [("run-as", "backup", "other"),
                            ("control", ("-f", "internal"), 10),
                            ("flush-kernel-table", "qrouter-r1"),
                            ("control", ("-n",), 10)]


def test_a_failed_kernel_flush_is_recorded_and_the_resync_still_runs(files, fp,
                                                                      monkeypatch):
    monkeypatch.setattr(Conntrackd, "run_as", lambda self, role, scheduler="other": False)
    fp.register(conntrackd_command(files, "-f", "internal"))
    fp.register(connection_table.flush_commands("qrouter-r1")[0], returncode=1,
                stderr="conntrack v1.4.7 (conntrack-tools): Operation failed\n")
    fp.register(conntrackd_command(files, "-n"))
    record = failover.run_transition("r1", Role.BACKUP, Conntrackd("conntrackd", "qrouter-r1", files, 10, 10, 5, 60), files,
                                     fast_options(standby_mode="warm"), 3000.0)
    assert record.outcome == "failed"
    assert record.errors == ["flush-kernel-table: conntrack -F -f ipv4 failed in "
                             "namespace qrouter-r1: conntrack v1.4.7 "
                             "(conntrack-tools): Operation failed"]
    assert [step.ok for step in record.steps] == [True, True, False, True]


def test_a_third_trigger_of_the_same_change_also_finds_it_done(files, conf, journal):
    """The watcher starts after the address appeared: its own start and the address
    event both report primary, and keepalived's notify comes third."""
    failover.run_transition("r1", Role.PRIMARY, FakeDaemon(files, journal), files,
                            conf, 2000.0, skip_if_done=True)
    before = files.last_transition.read_bytes()
    for arrived in (2000.1, 2000.2):
        journal.clear()
        late = FakeDaemon(files, journal)
        record = failover.run_transition("r1", Role.PRIMARY, late, files, conf,
                                         arrived, skip_if_done=True)
        assert record.outcome == "already-done"
        assert late.calls == []
    assert files.last_transition.read_bytes() == before
    assert statedir.read_latest_arrival(files.latest_arrival) == \
        statedir.LatestArrival(2000.2, confirmed_only=True)


def test_an_arrival_finer_than_a_microsecond_is_still_found_done(files, conf,
                                                                  journal):
    """The watcher stamps arrivals with time.time(): latest-arrival keeps six
    decimals, and the record must compare equal to what the file reads back."""
    arrived = 1795564674.7237809  # .6f rounds it up, past the unrounded value
    failover.run_transition("r1", Role.PRIMARY, FakeDaemon(files, journal), files,
                            conf, arrived, skip_if_done=True)
    journal.clear()
    record = failover.run_transition("r1", Role.PRIMARY, FakeDaemon(files, journal),
                                     files, conf, arrived + 0.05, skip_if_done=True)
    assert record.outcome == "already-done"
