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


def test_a_primary_whose_conntrackd_runs_the_backups_configuration_is_broken():
    """It reads no conntrack events: its flows reach no peer."""
    assert judge(primary_facts(conntrackd_configuration="backup")) == Verdict(
        BROKEN, "primary, but conntrackd runs the backup's configuration, which "
                "reads no conntrack events: nothing forwarded here is replicated")
    assert judge(primary_facts(conntrackd_configuration="primary")).word == IN_SYNC
    assert judge(backup_facts(conntrackd_configuration="backup")).word == IN_SYNC


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


# -- the replica against the table it copies, on figures fresh enough ----------------


def primary_report(kernel=200000, internal=199000, seen=NOW - 1.0, **overrides):
    peer = {"address": "169.254.192.2", "role": "primary", "seen": seen,
            "internal": internal, "external": 0, "kernel": kernel}
    peer.update(overrides)
    return report(checked=NOW - 0.5, check_interval=1.0, peers=[peer])


def resyncing(replica, kernel=200000, standby="warm", **report_overrides):
    figures = ({"kernel_entries": replica, "external_cache": 0} if standby == "warm"
               else {"kernel_entries": 12, "external_cache": replica})
    return backup_facts(standby_mode=standby,
                        report=primary_report(kernel, **report_overrides), **figures)


@pytest.mark.parametrize("standby", ["warm", "cold"])
def test_a_backup_short_of_the_primarys_table_is_resyncing(standby):
    verdict = judge(resyncing(120000, standby=standby))
    assert verdict.word == DEGRADED
    assert verdict.reason == ("resyncing, 120000 of 200000 entries from the primary "
                              "169.254.192.2: would lose 80000 entries if it failed "
                              "over now")
    found = health.replica(resyncing(120000, standby=standby), NOW)
    assert (found.replica_entries, found.primary_entries, found.missing_entries) == (
        120000, 200000, 80000)


@pytest.mark.parametrize("replica, primary, word", [
    (198000, 200000, IN_SYNC),    # 1 % short: within the tolerance
    (197999, 200000, DEGRADED),   # more than 1 %
    (84, 100, IN_SYNC),           # 16 short: within the 16-entry minimum
    (83, 100, DEGRADED),
    (200050, 200000, IN_SYNC),    # more than the primary: nothing missing
])
def test_short_means_more_than_1_percent_and_16_entries(replica, primary, word):
    facts = resyncing(replica, kernel=primary)
    assert judge(facts).word == word
    assert health.replica(facts, NOW).missing_entries == max(primary - replica, 0)


def test_the_primarys_table_is_its_kernel_count_else_its_internal_cache():
    # internal lags behind the kernel after a burst: it is not the table
    assert judge(resyncing(199000, kernel=200000, internal=150000)).word == IN_SYNC
    assert judge(resyncing(150000, kernel=200000, internal=150000)).word == DEGRADED
    verdict = judge(resyncing(150000, kernel=None, internal=150000))
    assert verdict == Verdict(IN_SYNC, "replica holds 150000 of the primary's 150000 "
                                       "entries")


def test_a_warm_backups_replica_is_its_kernel_a_cold_ones_its_external_cache():
    warm = backup_facts(standby_mode="warm", kernel_entries=200000, external_cache=0,
                        report=primary_report())
    cold = backup_facts(standby_mode="cold", kernel_entries=200000, external_cache=0,
                        report=primary_report())
    assert judge(warm).word == IN_SYNC
    assert judge(cold).reason.startswith("resyncing, 0 of 200000")


def test_a_stale_primary_report_is_degraded_saying_how_old():
    # check_interval 1 s: figures count for 2.5 s
    assert judge(resyncing(200000, seen=NOW - 2.4)).word == IN_SYNC
    verdict = judge(resyncing(200000, seen=NOW - 4.0))
    assert verdict == Verdict(
        DEGRADED, "the primary 169.254.192.2's latest report is 4 s old (older than "
                  "2 s): its table is unknown")


def test_figures_old_when_sent_count_as_old():
    """The primary's kernel count was read 2 s before the report left (a slow
    check): its age is the time in flight and the time before it."""
    assert judge(resyncing(200000, seen=NOW - 1.0, figures_age=1.0)).word == IN_SYNC
    assert judge(resyncing(200000, seen=NOW - 1.0, figures_age=2.0)).word == DEGRADED


def test_a_check_that_confirmed_health_json_keeps_its_fresh_reports_fresh():
    written = report(checked=NOW - 8.0, check_interval=1.0, peers=[
        {"address": "169.254.192.2", "role": "primary", "seen": NOW - 8.5,
         "internal": 200000, "external": 0, "kernel": 200000}])
    facts = backup_facts(standby_mode="warm", kernel_entries=200000)
    assert judge(dataclasses.replace(facts, report=written)).word == DEGRADED
    confirmed = dataclasses.replace(written, confirmed=NOW - 0.2)
    assert judge(dataclasses.replace(facts, report=confirmed)).word == IN_SYNC
    # a report already stale when the file was written stays stale
    old = report(checked=NOW - 8.0, check_interval=1.0, confirmed=NOW - 0.2, peers=[
        {"address": "169.254.192.2", "role": "primary", "seen": NOW - 12.0,
         "internal": 200000, "external": 0, "kernel": 200000}])
    old = dataclasses.replace(old, confirmed=NOW - 0.2)
    assert judge(dataclasses.replace(facts, report=old)).word == DEGRADED


def test_a_replica_conntrackd_cannot_count_is_not_in_sync():
    verdict = judge(resyncing(None, standby="cold"))
    assert verdict.word == DEGRADED
    assert verdict.reason.startswith("replica unknown")


def test_the_daemons_replica_short_problem_gives_way_to_the_newer_figures():
    facts = resyncing(200000)
    stale_problem = dataclasses.replace(facts.report, problems=(Problem(
        "replica-short", DEGRADED, NOW - 5,
        "replica holds 0 of the primary's 200000"),))
    assert judge(dataclasses.replace(facts, report=stale_problem)).word == IN_SYNC


def peers_report(*peers):
    return report(role="primary", checked=NOW - 0.5, check_interval=1.0,
                  peers=[{"address": address, "role": "backup", "seen": NOW - 1.0,
                          "internal": 3, "external": external, "kernel": kernel,
                          **extra}
                         for address, external, kernel, extra in peers])


def on_primary(*peers, kernel=200000):
    return primary_facts(standby_mode="warm", kernel_entries=kernel,
                         internal_cache=150000, report=peers_report(*peers))


def test_a_primary_names_each_resyncing_peer_and_what_a_failover_would_lose():
    facts = on_primary(("169.254.192.2", 0, 120000, {}),
                       ("169.254.192.3", 0, 200000, {}))
    assert judge(facts) == Verdict(
        DEGRADED, "peer 169.254.192.2 resyncing, 120000 of 200000; would lose 0 "
                  "entries if it failed over now")
    facts = on_primary(("169.254.192.2", 0, 120000, {}))
    assert judge(facts).reason == ("peer 169.254.192.2 resyncing, 120000 of 200000; "
                                   "would lose 80000 entries if it failed over now")
    assert health.replica(facts, NOW).missing_entries == 80000


def test_a_primary_takes_each_peers_replica_where_the_peer_keeps_it():
    # a cold peer's replica is its external cache, whatever this node's mode
    facts = on_primary(("169.254.192.2", 200000, 12, {"standby": "cold"}))
    assert judge(facts) == Verdict(
        IN_SYNC, "peer 169.254.192.2 holds 200000 of 200000 entries")


def test_a_primary_whose_table_grew_since_its_report_compares_the_peers_with_it():
    """Churn after a failover grows the primary's table by 2,000 entries a
    second: the peer's figures, a check old, are compared with the table the
    report was written with, not with entries they cannot show yet."""
    grown = on_primary(("169.254.192.2", 0, 150000, {}), kernel=156000)
    assert judge(grown).word == DEGRADED  # a report without its table: as before
    at_report = dataclasses.replace(grown, report=dataclasses.replace(
        grown.report, table=150100))
    assert judge(at_report) == Verdict(
        IN_SYNC, "peer 169.254.192.2 holds 150000 of 150100 entries")
    assert health.replica(at_report, NOW).missing_entries == 100
    # a peer short of the table at the report is short
    short = dataclasses.replace(at_report, report=dataclasses.replace(
        at_report.report, table=156000))
    assert judge(short).reason.startswith(
        "peer 169.254.192.2 resyncing, 150000 of 156000")
    # a table that shrank since: today's, the smaller
    shrank = dataclasses.replace(at_report, kernel_entries=149000)
    assert judge(shrank) == Verdict(
        IN_SYNC, "peer 169.254.192.2 holds 150000 of 149000 entries")


def test_the_reports_table_is_a_count_or_nothing():
    assert report(table=150100).table == 150100
    for bad in (-1, True, "150100", 1.5, 2**60):
        assert report(table=bad).table is None
    assert report().table is None


def test_a_primary_with_a_stale_peer_report_is_degraded():
    facts = on_primary(("169.254.192.2", 0, 200000, {"seen": NOW - 30}))
    assert judge(facts).reason == "peer 169.254.192.2's latest report is 30 s old"
