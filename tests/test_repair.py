"""Self-healing decisions: which faults a health check sees and what it repairs."""

import ipaddress

import pytest

from snat_sync import failover
from snat_sync import repair
from snat_sync.reports import PeerReport

PEER = "169.254.192.2"
PEERS = (ipaddress.ip_address(PEER),)
SETTINGS = repair.Settings(repair=True, repair_after=2, repair_backoff=30.0,
                           short_tolerance_percent=1.0, peer_timeout=10.0)


def observation(at, role="backup", internal=0, external=0, lost=0, malformed=0,
                alive=True, changed=None):
    return repair.Observation(at=at, role=role, conntrackd_alive=alive,
                              internal=internal, external=external, kernel=5,
                              messages_lost=lost, messages_malformed=malformed,
                              changed=changed)


def report(at, role="primary", internal=20000, external=0, changed=100.0):
    return PeerReport(PEER, role, changed, internal, external, 7, at, at)


def run_checks(observations, reports, settings=SETTINGS):
    """Assess a series of checks, carrying the memory; the assessments in order."""
    memory = repair.Memory()
    results = []
    for seen, heard in zip(observations, reports):
        assessment = repair.assess(seen, heard, PEERS, memory, settings)
        memory = assessment.memory
        results.append(assessment)
    return results


def kinds(assessment):
    return {problem.kind for problem in assessment.problems}


def test_a_backup_in_step_with_the_primary_has_no_problem():
    results = run_checks([observation(t, external=19990) for t in (0, 3, 6)],
                         [{PEER: report(t)} for t in (0, 3, 6)])
    assert [result.problems for result in results] == [(), (), ()]
    assert all(not result.repairs for result in results)


def test_a_short_replica_is_repaired_once_it_stops_moving():
    results = run_checks([observation(t, external=0) for t in (0, 3, 6, 9)],
                         [{PEER: report(t)} for t in (0, 3, 6, 9)])
    assert all("replica-short" in kinds(result) for result in results)
    assert results[0].repairs == ()  # seen once: it may be catching up
    assert [each.name for each in results[1].repairs] == [repair.REQUEST_RESYNC]
    assert results[1].repairs[0].steps == (failover.REQUEST_RESYNC,)
    assert results[2].repairs == () and results[3].repairs == ()  # backoff
    short = next(p for p in results[1].problems if p.kind == "replica-short")
    assert short.since == 0 and "0 of the primary 169.254.192.2's 20000" in short.message


def test_a_replica_still_catching_up_is_left_alone():
    results = run_checks([observation(t, external=e)
                          for t, e in ((0, 0), (3, 5000), (6, 10000), (9, 15000))],
                         [{PEER: report(t)} for t in (0, 3, 6, 9)])
    assert all(not result.repairs for result in results)


def test_a_primary_count_still_moving_is_waited_for():
    results = run_checks([observation(t, external=0) for t in (0, 3, 6)],
                         [{PEER: report(t, internal=n)}
                          for t, n in ((0, 1000), (3, 5000), (6, 9000))])
    assert all(not result.repairs for result in results)


def test_the_repair_is_repeated_after_the_backoff():
    times = (0, 3, 6, 9, 34)
    results = run_checks([observation(t) for t in times],
                         [{PEER: report(t)} for t in times])
    assert [bool(result.repairs) for result in results] == [False, True, False, False,
                                                           True]


def primary_counted(at, count, figures_age):
    """The primary's report reaching this node at `at`, its figures taken
    figures_age seconds before."""
    return {PEER: PeerReport(PEER, "primary", 100.0, count, 0, count, at, at,
                             taken=at - figures_age)}


def test_a_table_that_shrank_on_both_nodes_is_not_read_short():
    """Regression (soak): the backup's replica, read now, was compared with the
    primary's figures from seconds ago; when the table shrank on both nodes (a
    churn gap passing) the backup asked for a full resync every backoff."""
    times = (0, 3, 6, 9, 12)
    table = {t: 100000 if t < 5 else 97000 for t in range(-10, 13)}
    results = run_checks([observation(t, external=table[t] - 10) for t in times],
                         [primary_counted(t, table[t - 5], figures_age=5)
                          for t in times])
    assert [result.problems for result in results] == [()] * len(times)
    assert all(not result.repairs for result in results)


def test_a_flushed_replica_is_read_short_from_the_primary_s_next_report_on():
    times = (0, 3, 6, 9, 12)
    replica = {0: 100000, 3: 100000, 6: 0, 9: 0, 12: 0}
    results = run_checks([observation(t, external=replica[t]) for t in times],
                         [primary_counted(t, 100000, figures_age=1) for t in times])
    # At 6 the primary's figures are from 5, before this node's check at 6 saw
    # the flush; from 9 on they are from after it.
    assert ["replica-short" in kinds(result) for result in results] == [
        False, False, False, True, True]
    assert [bool(result.repairs) for result in results] == [
        False, False, False, False, True]
    assert "replica holds 0 of the primary 169.254.192.2's 100000" in next(
        p.message for p in results[3].problems if p.kind == "replica-short")


def test_a_warm_replica_is_compared_with_the_primary_s_kernel_table():
    """Regression (soak): under churn the primary's internal cache ran about 2,000
    entries ahead of its kernel table, and a warm replica (a kernel table) read
    short against it at every check."""
    def warm(at, kernel):
        return repair.Observation(at=at, role="backup", conntrackd_alive=True,
                                  internal=0, external=0, kernel=kernel,
                                  messages_lost=0, messages_malformed=0,
                                  standby="warm")

    def primary(at, kernel):
        return {PEER: PeerReport(PEER, "primary", 100.0, 102000, 0, kernel, at, at)}

    times = (0, 3, 6)
    in_step = run_checks([warm(t, 99950) for t in times],
                         [primary(t, 100000) for t in times])
    assert all(not result.problems and not result.repairs for result in in_step)
    short = run_checks([warm(t, 90000) for t in times],
                       [primary(t, 100000) for t in times])
    assert "replica holds 90000 of the primary 169.254.192.2's 100000" in next(
        p.message for p in short[0].problems if p.kind == "replica-short")
    assert [bool(result.repairs) for result in short] == [False, True, False]


def test_with_repair_off_the_fault_is_reported_but_not_repaired():
    settings = repair.Settings(False, 2, 30.0, 1.0, 10.0)
    results = run_checks([observation(t) for t in (0, 3, 6)],
                         [{PEER: report(t)} for t in (0, 3, 6)], settings)
    assert all("replica-short" in kinds(result) for result in results)
    assert all(not result.repairs for result in results)


def test_a_small_difference_is_within_tolerance():
    # 1% of 20000 = 200 entries.
    results = run_checks([observation(t, external=19850) for t in (0, 3, 6)],
                         [{PEER: report(t)} for t in (0, 3, 6)])
    assert all(not result.problems for result in results)
    assert repair.short_tolerance(100, 1.0) == repair.SHORT_TOLERANCE_MINIMUM


def test_a_primary_is_never_short():
    results = run_checks([observation(t, role="primary", internal=20000, external=0)
                          for t in (0, 3, 6)],
                         [{PEER: report(t, role="backup", internal=0,
                                        external=20000)} for t in (0, 3, 6)])
    assert all(not result.problems and not result.repairs for result in results)


def test_a_silent_peer_is_reported():
    results = run_checks([observation(0), observation(30)],
                         [{}, {PEER: report(5)}])
    assert [p.message for p in results[0].problems] == [
        "no report from peer 169.254.192.2's daemon yet"]
    assert [p.message for p in results[1].problems] == [
        "no report from peer 169.254.192.2's daemon for 25 s"]
    assert not results[1].repairs  # a stale report says nothing about the replica


def test_split_brain_is_broken_and_the_survivor_resyncs_once_the_peer_yields():
    times = (0, 3, 6, 9)
    results = run_checks(
        [observation(t, role="primary", internal=20000) for t in times],
        [{PEER: report(0, role="backup", changed=100.0)},
         {PEER: report(3, role="primary", changed=103.0)},
         {PEER: report(6, role="backup", changed=106.0)},
         {PEER: report(9, role="backup", changed=106.0)}])
    assert kinds(results[1]) == {"split-brain"}
    assert next(iter(results[1].problems)).severity == repair.BROKEN
    assert results[1].repairs == ()  # not while both forward
    assert [each.name for each in results[2].repairs] == [repair.SURVIVOR_RESYNC]
    assert results[2].repairs[0].steps == (failover.ANNOUNCE_ADDRESSES,
                                           failover.RESYNC_FROM_KERNEL,
                                           failover.BULK_SEND)
    assert results[3].repairs == ()  # nothing new happened on the peer


def test_the_last_report_of_a_primary_that_died_is_no_split_brain():
    """The old primary's last report stays fresh for peer_timeout after it died;
    this node took over after it arrived. A report that arrives after the
    takeover and still says primary is a split brain."""
    last_words = report(1, role="primary", changed=50.0)
    results = run_checks(
        [observation(t, role="primary", internal=20000, changed=2.0)
         for t in (3, 6, 9)],
        [{PEER: last_words}, {PEER: last_words},
         {PEER: report(8, role="primary", changed=50.0)}])
    assert [kinds(result) for result in results] == [set(), set(), {"split-brain"}]


def test_a_peer_that_yielded_unseen_is_still_resynced():
    """The HA link was cut: the split brain was never reported, only its end."""
    results = run_checks(
        [observation(t, role="primary", internal=20000) for t in (0, 30)],
        [{PEER: report(0, role="backup", changed=100.0)},
         {PEER: report(30, role="backup", changed=125.0)}])
    assert [each.name for each in results[1].repairs] == [repair.SURVIVOR_RESYNC]


def test_the_first_report_of_a_peer_triggers_nothing():
    results = run_checks([observation(0, role="primary", internal=20000)],
                         [{PEER: report(0, role="backup", changed=100.0)}])
    assert results[0].repairs == ()


def test_lost_and_malformed_messages_are_reported_as_they_grow():
    results = run_checks(
        [observation(0, lost=10), observation(3, lost=25, malformed=1),
         observation(6, lost=25, malformed=1), observation(9, lost=3)],
        [{PEER: report(t, internal=0)} for t in (0, 3, 6, 9)])
    assert kinds(results[0]) == set()
    assert {p.message for p in results[1].problems} == {
        "15 sync messages lost since the last check (FTFW asks for them again)",
        "1 sync messages malformed since the last check"}
    assert kinds(results[2]) == set()
    assert kinds(results[3]) == set()  # counters went back: conntrackd restarted


def test_lost_messages_are_not_counted_with_two_peers():
    """With two peers conntrackd's one sequence of received numbers jumps at
    every switch between the senders: thousands of "lost" messages at each
    check, none lost. Malformed ones still count; with one peer lost ones do."""
    other = "169.254.192.3"
    peers = PEERS + (ipaddress.ip_address(other),)
    memory = repair.Memory()
    found = []
    for at, lost, malformed in ((0, 0, 0), (3, 10005, 0), (6, 20016, 2)):
        heard = {PEER: report(at),
                 other: PeerReport(other, "backup", 100.0, 0, 0, 20000, at, at)}
        assessment = repair.assess(observation(at, external=20000, lost=lost,
                                               malformed=malformed),
                                   heard, peers, memory, SETTINGS)
        memory = assessment.memory
        found.append(kinds(assessment))
    assert found == [set(), set(), {"messages-malformed"}]
    one = run_checks([observation(0), observation(3, lost=15)],
                     [{PEER: report(0)}, {PEER: report(3)}])
    assert "messages-lost" in kinds(one[1])


def test_conntrackd_down_is_broken():
    result = run_checks([observation(0, alive=False)], [{PEER: report(0)}])[0]
    assert ("conntrackd-down", repair.BROKEN) in {
        (p.kind, p.severity) for p in result.problems}


@pytest.mark.parametrize("interval", [1, 3, 10])
def test_a_problem_keeps_the_time_it_was_first_seen(interval):
    times = [interval * n for n in range(4)]
    results = run_checks([observation(t) for t in times],
                         [{PEER: report(t)} for t in times])
    assert {p.since for r in results for p in r.problems if p.kind == "replica-short"
            } == {0}
