"""The verdict on a router's replication, and reading health.json as untrusted input."""

import dataclasses
import json

import pytest

from snat_sync import health
from snat_sync.health import (BROKEN, DEGRADED, IN_SYNC, Facts, HealthReport, Problem,
                              ReportedPeer, Verdict)

NOW = 1764000010.0

# health.json as the node daemon writes it
HEALTH_JSON = {
    "checked": 1764000009.5, "interval": 3.0, "role": "backup",
    "peers": [{"address": "169.254.192.2", "role": "primary", "seen": 1764000009.1,
               "internal": 20200, "external": 0, "kernel": 20210}],
    "problems": [],
    "repairs": [{"kind": "repair", "repair": "request-resync", "started": 1764000001.0,
                 "finished": 1764000001.2, "outcome": "done", "reason": "short",
                 "steps": []}],
}


def report(**overrides):
    return health.parse_report({**HEALTH_JSON, **overrides})


def problem(severity, message, kind="replica-short"):
    return {"kind": kind, "severity": severity, "since": 1764000000.0,
            "message": message}


def backup_facts(**overrides):
    values = {
        "spec_readable": True, "namespace": "qrouter-r1", "namespace_exists": True,
        "conntrackd_alive": True, "cache_full_drops": 0,
        "last_transition": {"role": "backup", "outcome": "done", "errors": []},
        "role": "backup", "internal_cache": 3, "external_cache": 20200,
        "report": report(),
    }
    values.update(overrides)
    return Facts(**values)


def primary_facts(**overrides):
    primary_report = report(role="primary", peers=[
        {"address": "169.254.192.2", "role": "backup", "seen": 1764000009.1,
         "internal": 3, "external": 20200, "kernel": 3}])
    values = {"role": "primary", "internal_cache": 20203, "external_cache": 0,
              "report": primary_report}
    return backup_facts(**{**values, **overrides})


def judge(facts):
    return health.judge(facts, NOW)


# -- in-sync ---------------------------------------------------------------------------


def test_a_backup_in_sync_names_its_replica_and_the_primarys_count():
    # The primary's table is its kernel count (20210), not its internal cache.
    assert judge(backup_facts()) == Verdict(
        IN_SYNC, "replica holds 20200 of the primary's 20210 entries")


def test_a_primary_in_sync_names_what_each_peer_holds():
    assert judge(primary_facts()) == Verdict(
        IN_SYNC, "peer 169.254.192.2 holds 20200 of 20203 entries")


def test_without_peer_figures_nothing_shows_the_replica_complete():
    # Was in-sync ("replica holds 20200 entries"): in sync with nothing.
    silent = report(peers=[])
    assert judge(backup_facts(report=silent)) == Verdict(
        DEGRADED, "no report from the primary's daemon: its table is unknown")
    assert judge(primary_facts(report=silent)) == Verdict(
        DEGRADED, "no report from any peer's daemon: what the peers hold is unknown")


# -- broken, in the order the rules are tried ------------------------------------------


def test_an_unreadable_spec_is_broken_before_anything_else():
    facts = backup_facts(spec_readable=False, namespace_exists=False,
                         conntrackd_alive=False)
    assert judge(facts) == Verdict(BROKEN, "its spec.json is missing or unreadable")


def test_a_missing_namespace_is_broken():
    facts = backup_facts(namespace_exists=False, conntrackd_alive=False)
    assert judge(facts) == Verdict(BROKEN, "namespace qrouter-r1 does not exist")


def test_conntrackd_not_running_is_broken():
    facts = backup_facts(conntrackd_alive=False, cache_full_drops=None)
    assert judge(facts) == Verdict(BROKEN, "conntrackd is not running")


def test_a_full_cache_is_broken_and_says_what_to_raise():
    verdict = judge(backup_facts(cache_full_drops=69000))
    assert verdict.word == BROKEN
    assert verdict.reason == ("conntrackd's cache ran full and dropped 69000 "
                              "entries; raise [conntrackd] hash_limit")


def test_a_failed_last_transition_is_broken_with_its_first_error():
    last = {"role": "primary", "outcome": "failed",
            "errors": ["commit: 7 entries could not be committed", "second"]}
    assert judge(backup_facts(last_transition=last)) == Verdict(
        BROKEN, "the primary transition failed: commit: 7 entries could not be "
                "committed")


@pytest.mark.parametrize("last, reason", [
    ({"outcome": "failed"}, "the last transition failed"),
    ({"outcome": "failed", "role": 7, "errors": "x"}, "the last transition failed"),
    ({"outcome": "failed", "role": "backup", "errors": ["\x1b[2Jgone"]},
     "the backup transition failed: ?[2Jgone"),
])
def test_a_damaged_failed_transition_record_is_still_broken(last, reason):
    assert judge(backup_facts(last_transition=last)) == Verdict(BROKEN, reason)


@pytest.mark.parametrize("outcome", ["done", "superseded", "already-done", "running"])
def test_a_transition_that_did_not_fail_is_no_problem(outcome):
    last = {"role": "backup", "outcome": outcome, "errors": []}
    assert judge(backup_facts(last_transition=last)).word == IN_SYNC


def test_a_fresh_broken_problem_is_broken_with_its_message():
    facts = primary_facts(report=report(role="primary", problems=[
        problem(DEGRADED, "no report from peer 169.254.192.3's daemon yet",
                "peer-silent"),
        problem(BROKEN, "split brain: peer 169.254.192.2 is primary too",
                "split-brain")]))
    assert judge(facts) == Verdict(
        BROKEN, "split brain: peer 169.254.192.2 is primary too")


def test_a_stale_broken_problem_no_longer_counts():
    stale = report(checked=NOW - 9.5, problems=[
        problem(BROKEN, "split brain: peer 169.254.192.2 is primary too")])
    verdict = judge(backup_facts(report=stale))
    assert verdict == Verdict(DEGRADED, "no health check from the node daemon in "
                                        "10 s — is `snat-sync daemon` running?")


# -- degraded --------------------------------------------------------------------------


def test_no_health_check_at_all_is_degraded():
    assert judge(backup_facts(report=None)) == Verdict(
        DEGRADED, "no health check from the node daemon yet — is `snat-sync daemon` "
                  "running?")


def test_health_json_is_fresh_for_three_intervals():
    assert judge(backup_facts(report=report(checked=NOW - 9.0))).word == IN_SYNC
    assert judge(backup_facts(report=report(checked=NOW - 9.01))).word == DEGRADED


def test_a_fresh_degraded_problem_is_degraded_with_its_message():
    facts = backup_facts(external_cache=0, report=report(problems=[
        problem(DEGRADED, "12 sync messages lost since the last check",
                "messages-lost")]))
    assert judge(facts) == Verdict(
        DEGRADED, "12 sync messages lost since the last check")


def test_several_problems_of_one_severity_are_all_named():
    facts = backup_facts(report=report(problems=[
        problem(DEGRADED, "12 sync messages lost since the last check",
                "messages-lost"),
        problem(DEGRADED, "no report from peer 169.254.192.3's daemon yet",
                "peer-silent")]))
    assert judge(facts).reason == ("12 sync messages lost since the last check; no "
                                   "report from peer 169.254.192.3's daemon yet")


def test_an_unknown_role_is_degraded():
    verdict = judge(backup_facts(role="unknown"))
    assert verdict.word == DEGRADED
    assert verdict.reason.startswith("role unknown")


# -- health.json -----------------------------------------------------------------------


def test_parse_report_of_what_the_daemon_writes():
    data = json.loads(json.dumps({**HEALTH_JSON, "problems": [
        problem(DEGRADED, "external cache holds 0 of the primary's 20200 entries")]}))
    assert health.parse_report(data) == HealthReport(
        checked=1764000009.5, interval=3.0, role="backup",
        peers=(ReportedPeer("169.254.192.2", "primary", 1764000009.1, 20200, 0,
                            20210),),
        problems=(Problem("replica-short", DEGRADED, 1764000000.0,
                          "external cache holds 0 of the primary's 20200 entries"),),
        last_repair=HEALTH_JSON["repairs"][-1],
    )


@pytest.mark.parametrize("data", [
    None, [], "x", 3, {}, {"checked": 1.0}, {"interval": 3.0},
    {"checked": "1764000000", "interval": 3.0}, {"checked": True, "interval": 3.0},
    {"checked": float("nan"), "interval": 3.0}, {"checked": 1.0, "interval": 0},
    {"checked": 1.0, "interval": -3.0}, {"checked": 1.0, "interval": float("inf")},
])
def test_a_report_without_a_valid_check_time_and_interval_is_none(data):
    assert health.parse_report(data) is None


def test_malformed_peers_and_problems_are_left_out():
    parsed = report(
        role="leader",
        peers=["169.254.192.2", None, {"role": "primary"}, {"address": 7},
               {"address": "169.254.192.3", "role": "master", "seen": "now",
                "internal": -1, "external": True, "kernel": 2**60}],
        problems=[None, {"severity": "fatal", "message": "x"},
                  {"severity": BROKEN}, {"severity": BROKEN, "message": ""},
                  {"severity": BROKEN, "message": "split\x1b[0m", "kind": ["x"],
                   "since": "yesterday"}],
        repairs=[{"repair": "request-resync"}, "not a repair"],
    )
    assert parsed.role == "unknown"
    assert parsed.peers == (ReportedPeer("169.254.192.3", "unknown", None, None, None,
                                         None),)
    assert parsed.problems == (Problem("unknown", BROKEN, None, "split?[0m"),)
    assert parsed.last_repair is None
    assert report(peers="x", problems={"a": 1}, repairs=None) == dataclasses.replace(
        report(), peers=(), problems=(), last_repair=None)


def test_parse_report_bounds_what_it_keeps():
    parsed = report(
        peers=[{"address": f"169.254.192.{index % 250}"} for index in range(1000)],
        problems=[problem(DEGRADED, "m" * 10000)] * 1000)
    assert len(parsed.peers) == health.MAX_PEERS
    assert len(parsed.problems) == health.MAX_PROBLEMS
    assert len(parsed.problems[0].message) == health.MAX_TEXT


def test_report_peer_finds_a_peer_by_address():
    assert report().peer("169.254.192.2").internal == 20200
    assert report().peer("169.254.192.9") is None
