"""A router's history and counters: bounded, robust to damage, counted right; and
`snat-sync history ROUTER`."""

import json
import os
import time

import pytest

from snat_sync import cli
from snat_sync import failover
from snat_sync import history
from snat_sync import statedir
from snat_sync.conntrackd import CacheStats
from snat_sync.failover import HookStep, Role

ALL_BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5",
               "5.0", "10.0", "30.0", "60.0", "+Inf"]


def transition(arrived=1000.0, role="primary", outcome="done", commit_ms=None,
               commit_ok=True, errors=()):
    """A TransitionRecord.to_dict() as run_transition makes it."""
    steps = []
    if commit_ms is not None:
        steps.append({"name": "commit", "started": arrived, "duration_ms": commit_ms,
                      "ok": commit_ok, "error": None if commit_ok else "timed out",
                      "run_by": "snat-sync"})
    steps.append({"name": "lift-guard", "started": arrived, "duration_ms": 1.5,
                  "ok": True, "error": None, "run_by": "snat-sync"})
    return {"router": "r1", "role": role, "arrived": arrived, "started": arrived,
            "finished": arrived + 0.25, "outcome": outcome, "steps": steps,
            "commit": None, "errors": list(errors)}


def repair(started=2000.0, name="request-resync", outcome="done"):
    return {"kind": "repair", "repair": name, "router": "r1", "started": started,
            "finished": started + 0.5, "outcome": outcome,
            "reason": "the backup's external cache is 0 entries short of 16",
            "steps": [{"name": "request-resync", "duration_ms": 500.0,
                       "ok": outcome == "done",
                       "error": None if outcome == "done" else "cannot connect"}]}


# -- the history file ---------------------------------------------------------------


def test_the_history_keeps_the_newest_entries_up_to_the_limit(router_files):
    for arrived in range(15):
        history.record_transition(router_files, transition(float(arrived)), 10)
    lines = router_files.history.read_text().splitlines()
    assert len(lines) == 10
    assert [json.loads(line)["arrived"] for line in lines] == list(range(5, 15))
    assert [entry["arrived"] for entry in history.read_history(router_files)] \
        == list(range(5, 15))


def test_a_lower_limit_drops_the_oldest_at_once(router_files):
    for arrived in range(10):
        history.record_transition(router_files, transition(float(arrived)), 10)
    history.record_repair(router_files, repair(), 3)
    entries = history.read_history(router_files)
    assert [entry["kind"] for entry in entries] == ["transition", "transition", "repair"]
    assert [entry.get("arrived") for entry in entries[:2]] == [8.0, 9.0]


def test_an_entry_is_the_record_with_its_kind(router_files):
    record = transition(commit_ms=4.3)
    history.record_transition(router_files, record, 10)
    history.record_repair(router_files, repair(), 10)
    assert history.read_history(router_files) == [{"kind": "transition", **record},
                                                  repair()]
    assert os.stat(router_files.history).st_mode & 0o777 == 0o600


def test_read_history_with_a_limit_returns_the_newest_oldest_first(router_files):
    for arrived in range(5):
        history.record_transition(router_files, transition(float(arrived)), 10)
    assert [entry["arrived"] for entry in history.read_history(router_files, 2)] \
        == [3.0, 4.0]


def test_without_a_file_the_history_is_empty(router_files):
    assert history.read_history(router_files) == []


def test_unreadable_lines_are_skipped_and_dropped_at_the_next_write(router_files):
    good = [json.dumps({"kind": "transition", **transition(float(arrived))})
            for arrived in (1, 2, 3)]
    too_long = json.dumps({"kind": "transition", "padding": "x" * (1024 * 1024)})
    router_files.history.write_bytes("\n".join([
        good[0], "this is no JSON", "[1, 2]", "", too_long, good[1],
        good[2][:30]]).encode()
        + b'\n{"kind": "transition", "router": "r\xff"}\n\xff\xfe{}\n'
        + good[2].encode())
    assert [entry["arrived"] for entry in history.read_history(router_files)] \
        == [1.0, 2.0, 3.0]
    history.record_transition(router_files, transition(4.0), 10)
    lines = router_files.history.read_text().splitlines()
    assert [json.loads(line)["arrived"] for line in lines] == [1.0, 2.0, 3.0, 4.0]


def test_a_symlinked_history_is_not_followed(router_files, tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps({"kind": "transition"}) + "\n")
    router_files.history.symlink_to(elsewhere)
    assert history.read_history(router_files) == []


# -- counters -----------------------------------------------------------------------


def test_without_a_file_the_counters_are_all_zero_with_every_bucket(router_files):
    counters = history.read_counters(router_files)
    assert counters == history.zero_counters()
    assert list(counters["commit_seconds"]["buckets"]) == ALL_BUCKETS
    assert set(counters["commit_seconds"]["buckets"].values()) == {0}
    assert (counters["commit_seconds"]["sum"], counters["commit_seconds"]["count"]) \
        == (0.0, 0)
    assert counters["repairs"] == {}
    assert counters["transitions"]["backup"] == {"done": 0, "failed": 0,
                                                 "superseded": 0, "already-done": 0}


@pytest.mark.parametrize("content", ["", "garbage", "[]", '{"transitions": 3}',
                                     '{"commit_seconds": {"buckets": {"0.005": 1}, '
                                     '"sum": 1, "count": 1}}'])
def test_unreadable_counters_read_as_zero(router_files, content):
    router_files.counters.write_text(content)
    assert history.read_counters(router_files) == history.zero_counters()


def test_the_readable_parts_of_damaged_counters_are_kept(router_files):
    router_files.counters.write_text(json.dumps({
        "transitions": {"primary": {"done": 4, "failed": "many", "superseded": -1},
                        "backup": [1]},
        "repairs": {"request-resync": {"done": 2, "failed": True}},
        "commit_seconds": {"buckets": dict.fromkeys(ALL_BUCKETS, 1), "sum": "x",
                           "count": 1}}))
    counters = history.read_counters(router_files)
    assert counters["transitions"]["primary"] == {"done": 4, "failed": 0,
                                                  "superseded": 0, "already-done": 0}
    assert counters["repairs"] == {"request-resync": {"done": 2}}
    assert counters["commit_seconds"] == history.zero_counters()["commit_seconds"]


@pytest.mark.parametrize("role", ["primary", "backup", "fault", "stop"])
@pytest.mark.parametrize("outcome", ["done", "failed", "superseded", "already-done"])
def test_each_transition_counts_once_by_role_and_outcome(router_files, role, outcome):
    history.record_transition(router_files, transition(role=role, outcome=outcome), 10)
    history.record_transition(router_files, transition(role=role, outcome=outcome), 10)
    counters = history.read_counters(router_files)
    expected = history.zero_counters()["transitions"]
    expected[role][outcome] = 2
    assert counters["transitions"] == expected
    assert counters == statedir.read_json(router_files.counters)


def test_repairs_count_by_name_and_outcome(router_files):
    history.record_repair(router_files, repair(), 10)
    history.record_repair(router_files, repair(outcome="failed"), 10)
    history.record_repair(router_files, repair(name="survivor-resync"), 10)
    history.record_repair(router_files, repair(), 10)
    counters = history.read_counters(router_files)
    assert counters["repairs"] == {"request-resync": {"done": 2, "failed": 1},
                                   "survivor-resync": {"done": 1}}
    assert counters["transitions"] == history.zero_counters()["transitions"]


def test_the_counters_keep_growing_past_the_history_limit(router_files):
    for arrived in range(12):
        history.record_transition(router_files, transition(float(arrived)), 10)
    assert history.read_counters(router_files)["transitions"]["primary"]["done"] == 12


def test_the_commit_histogram_is_cumulative_with_sum_and_count(router_files):
    for milliseconds in (3.0, 5.0, 30.0, 700.0, 100_000.0):
        history.record_transition(router_files, transition(commit_ms=milliseconds), 10)
    histogram = history.read_counters(router_files)["commit_seconds"]
    assert histogram["buckets"] == {
        "0.005": 2, "0.01": 2, "0.025": 2, "0.05": 3, "0.1": 3, "0.25": 3, "0.5": 3,
        "1.0": 4, "2.5": 4, "5.0": 4, "10.0": 4, "30.0": 4, "60.0": 4, "+Inf": 5}
    assert histogram["count"] == 5
    assert histogram["sum"] == pytest.approx(100.738)


def test_only_a_commit_that_ran_ok_is_observed(router_files):
    history.record_transition(router_files, transition(commit_ms=3.0, commit_ok=False,
                                                       outcome="failed"), 10)
    history.record_transition(router_files, transition(role="backup"), 10)
    histogram = history.read_counters(router_files)["commit_seconds"]
    assert histogram == history.zero_counters()["commit_seconds"]


def test_the_names_match_the_state_machine():
    assert history.COMMIT_STEP == failover.COMMIT.name
    assert history.TRANSITION_ROLES == tuple(role.value for role in Role)


# -- through run_transition ---------------------------------------------------------


class FakeDaemon:
    namespace = "qrouter-r1"

    def __init__(self, files, fail=()):
        self.files = files
        self.fail = fail

    def start(self, scheduler_policy="other"):
        return False

    def run_as(self, role, scheduler_policy="other"):
        return False

    def control(self, *arguments, timeout=None, check=True):
        if arguments[0] in self.fail:
            raise failover.conntrackd_module.ConntrackdError("cannot connect")

    def cache_stats(self, timeout=None):
        return CacheStats(internal_active=0, external_active=3, internal_no_space=0,
                          external_no_space=0)


@pytest.fixture
def files(router_files, monkeypatch):
    monkeypatch.setattr(failover.guard, "raise_guard", lambda namespace, files: None)
    monkeypatch.setattr(failover.guard, "lift_guard", lambda namespace, files: None)
    router_files.log_file.write_text(
        "[Tue Nov 24 20:13:56 2026] (pid=1) [notice] committing all external caches\n"
        "[Tue Nov 24 20:13:56 2026] (pid=1) [notice] Committed 3 new entries\n"
        "[Tue Nov 24 20:13:56 2026] (pid=1) [notice] commit has taken 0.000010 "
        "seconds\n")
    return router_files


def test_every_transition_outcome_is_recorded_and_counted(files, conf):
    run = failover.run_transition
    run("r1", Role.PRIMARY, FakeDaemon(files), files, conf, 1000.0)
    run("r1", Role.BACKUP, FakeDaemon(files), files, conf, 999.0)
    run("r1", Role.PRIMARY, FakeDaemon(files), files, conf, 1001.0, skip_if_done=True)
    run("r1", Role.BACKUP, FakeDaemon(files, fail=("-n",)), files, conf, 1002.0)
    assert [(entry["role"], entry["outcome"]) for entry in history.read_history(files)] \
        == [("primary", "done"), ("backup", "superseded"), ("primary", "already-done"),
            ("backup", "failed")]
    transitions = history.read_counters(files)["transitions"]
    assert (transitions["primary"]["done"], transitions["backup"]["superseded"],
            transitions["primary"]["already-done"], transitions["backup"]["failed"]) \
        == (1, 1, 1, 1)
    assert sum(sum(outcomes.values()) for outcomes in transitions.values()) == 4
    assert statedir.read_json(files.last_transition)["outcome"] == "failed"


def test_a_commit_the_hook_ran_is_observed(files, cold_conf):
    failover.run_transition("r1", Role.PRIMARY, FakeDaemon(files), files, cold_conf, 1000.0,
                            [HookStep("commit", 1000.1, 1000.3, 0)])
    histogram = history.read_counters(files)["commit_seconds"]
    assert histogram["count"] == 1
    assert histogram["sum"] == pytest.approx(0.2, abs=1e-6)
    assert (histogram["buckets"]["0.1"], histogram["buckets"]["0.25"]) == (0, 1)


def test_a_commit_the_hook_failed_is_not_observed(files, cold_conf):
    failover.run_transition("r1", Role.PRIMARY, FakeDaemon(files), files, cold_conf, 1000.0,
                            [HookStep("commit", 1000.1, 1000.3, 124)])
    assert history.read_counters(files)["commit_seconds"]["count"] == 0
    assert history.read_counters(files)["transitions"]["primary"]["failed"] == 1


# -- snat-sync history ROUTER ---------------------------------------------------------


def run(state_path, *arguments):
    return cli.main(["--state-path", str(state_path), *arguments])


@pytest.fixture
def known_router(router_files, spec):
    statedir.write_json(router_files.spec, spec.to_dict())
    return router_files


def local(epoch):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) + ".250"


def test_history_prints_one_line_per_entry_newest_last(state_path, known_router,
                                                       capsys):
    arrived = time.mktime((2026, 11, 24, 20, 13, 56, 0, 0, -1)) + 0.25
    record = transition(arrived, commit_ms=4.3)
    record["commit"] = {"committed": 32, "already_present": 0, "failed": 1,
                        "seconds": 0.004, "expected": 33}
    record["errors"] = ["commit: 1 of 33 entries could not be committed"]
    history.record_transition(known_router, record, 10)
    history.record_repair(known_router, repair(arrived + 60, outcome="failed"), 10)
    assert run(state_path, "history", "r1") == 0
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["TIME", "KIND", "WHAT", "OUTCOME", "TOTAL", "STEPS",
                              "COMMITTED/EXPECTED/FAILED", "FIRST", "ERROR"]
    assert first.split("  ")[0] == "2026-11-24 20:13:56.250"
    assert first.split() == [
        "2026-11-24", "20:13:56.250", "transition", "primary", "done", "250.0ms",
        "commit=4.3ms", "lift-guard=1.5ms", "32/33/1", "commit:", "1", "of", "33",
        "entries", "could", "not", "be", "committed"]
    assert second.split() == [
        *local(arrived + 60).split(), "repair", "request-resync", "failed", "500.0ms",
        "request-resync=FAILED(500.0ms)", "-", "cannot", "connect"]
    assert header.index("STEPS") == first.index("commit=") \
        == second.index("request-resync=")


def test_history_json_prints_the_entries(state_path, known_router, capsys):
    for arrived in range(3):
        history.record_transition(known_router, transition(float(arrived)), 10)
    assert run(state_path, "history", "r1", "--json", "--limit", "2") == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries == history.read_history(known_router)[1:]


def test_history_of_a_router_without_any(state_path, known_router, capsys):
    assert run(state_path, "history", "r1") == 0
    assert capsys.readouterr().out == "no history\n"


@pytest.mark.parametrize("limit", ["0", "-1", "10001"])
def test_history_with_a_limit_out_of_range_exits_2(state_path, known_router, capsys,
                                                   limit):
    assert run(state_path, "history", "r1", "--limit", limit) == 2
    assert f"invalid --limit {limit}: must be from 1 to 10000" \
        in capsys.readouterr().err


def test_history_with_a_limit_that_is_no_number_exits_2(state_path, known_router,
                                                        capsys):
    with pytest.raises(SystemExit) as exited:
        run(state_path, "history", "r1", "--limit", "ten")
    assert exited.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_history_of_an_unknown_router_exits_2(state_path, capsys):
    assert run(state_path, "history", "r9") == 2
    assert "invalid router 'r9': unknown here" in capsys.readouterr().err
    assert not (state_path / "routers" / "r9").exists()


def test_history_help_explains_it(state_path, capsys):
    with pytest.raises(SystemExit) as exited:
        run(state_path, "history", "--help")
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "latest transitions and repairs" in text
    assert "--limit N show the newest N only, 1 to 10000" in text


def test_format_history_shows_mistyped_fields_as_dashes():
    text = cli.format_history([{"kind": "transition", "arrived": "soon",
                                "steps": [{"name": "commit", "ok": True}, "junk"],
                                "commit": {"committed": 3}, "errors": "oops\nbad"},
                               {"kind": "repair", "repair": "x\x1b[2Jy"}])
    header, first, second = text.splitlines()
    assert first.split() == ["-", "transition", "-", "-", "-", "commit=-", "3/-/-", "-"]
    assert second.split() == ["-", "repair", "x", "[2Jy", "-", "-", "-", "-", "-"]
