"""snat_sync.lab.soak's decisions (the schedule, the judging, the rows and the last
line) and lab.churn's pacing: pure, no root."""

import collections

import pytest
from hypothesis import given
from hypothesis import strategies

from snat_sync.lab import churn
from snat_sync.lab import soak


def counts(schedule):
    return collections.Counter(fault.kind for fault in schedule)


def test_the_schedule_is_reproducible_from_its_seed():
    assert soak.draw_schedule(7, 10) == soak.draw_schedule(7, 10)
    assert soak.draw_schedule(7, 10) != soak.draw_schedule(8, 10)


@given(strategies.integers(0, 2**32))
def test_a_ten_minute_schedule_draws_every_kind_twice(seed):
    schedule = soak.draw_schedule(seed, 10)
    assert set(counts(schedule)) == set(soak.KINDS)
    assert min(counts(schedule).values()) >= 2


@given(strategies.integers(0, 2**32), strategies.floats(1, 30))
def test_faults_keep_their_spacing_and_end_in_time(seed, minutes):
    schedule = soak.draw_schedule(seed, minutes)
    times = [0.0] + [fault.at for fault in schedule]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(soak.SPACING[0] - 0.1 <= gap <= soak.SPACING[1] + 0.1 for gap in gaps)
    assert all(fault.at <= minutes * 60 - soak.SPACING[0] for fault in schedule)


def test_a_short_schedule_cuts_the_shuffled_order():
    """Two minutes hold 5 faults 20 s apart: fewer than the kinds, each at most
    once or twice, never outside the catalogue."""
    schedule = soak.draw_schedule(3, 2)
    assert 1 <= len(schedule) <= 5
    assert set(counts(schedule)) <= set(soak.KINDS)


def test_a_subset_with_one_copy_covers_the_subset():
    kinds = ("crash-flushed", "kill-daemon", "sync-loss")
    schedule = soak.draw_schedule(5, 2, kinds=kinds, spacing=(15.0, 25.0), copies=1)
    assert sorted(fault.kind for fault in schedule[:3]) == sorted(kinds)


def test_each_kind_hits_the_node_it_names():
    schedule = soak.draw_schedule(11, 30)
    for fault in schedule:
        if fault.kind in soak.EITHER_NODE:
            assert fault.node in ("primary", "backup")
        else:
            assert fault.node == soak.NODE_OF.get(fault.kind, "primary"), fault
        if fault.kind == "partition":
            shortest, longest = soak.PARTITION_SECONDS
            assert shortest <= fault.seconds <= longest
        elif fault.kind == "sync-loss":
            assert fault.seconds == soak.SYNC_LOSS_SECONDS
        else:
            assert fault.seconds == 0.0
    either = {fault.node for fault in schedule if fault.kind in soak.EITHER_NODE}
    assert either == {"primary", "backup"}


def test_two_or_three_nodes():
    assert soak.check_node_count(2) == 2
    assert soak.check_node_count(3) == 3
    with pytest.raises(ValueError, match="--nodes 1: .* 2 or 3 nodes only"):
        soak.check_node_count(1)
    with pytest.raises(ValueError, match="--nodes 4"):
        soak.check_node_count(4)


def test_a_backup_fault_picks_its_backup_from_its_seed():
    assert soak.pick_backup(["r2"], 7) == "r2"
    assert soak.pick_backup(["r3", "r2"], 0) == "r2"
    assert soak.pick_backup(["r3", "r2"], 1) == "r3"
    picked = {soak.pick_backup(["r1", "r3"], fault.seed)
              for fault in soak.draw_schedule(7, 10)}
    assert picked == {"r1", "r3"}


def test_a_primary_settles_once_it_held_the_vips_long_enough():
    run = soak.follow_holder(None, "r2", 10.0)
    assert run == ("r2", 10.0)
    assert soak.follow_holder(run, "r2", 12.0) == ("r2", 10.0)
    assert soak.settled_holder(run, 13.9, stable=4.0) is None
    assert soak.settled_holder(run, 14.0, stable=4.0) == "r2"
    # the VIPs moved (or two nodes held them): the run starts again
    moved = soak.follow_holder(soak.follow_holder(run, None, 12.5), "r2", 13.0)
    assert moved == ("r2", 13.0)
    assert soak.settled_holder(moved, 16.0, stable=4.0) is None
    assert soak.settled_holder(("r1", 0.0), 16.0, stable=4.0) == "r1"
    assert soak.settled_holder((None, 0.0), 16.0, stable=4.0) is None
    assert soak.settled_holder(None, 16.0) is None


def reading(verdict="in-sync", taken=105.0):
    return {"verdict": verdict, "taken": taken}


def test_in_sync_takes_every_node_in_sync_in_one_fresh_moment():
    names = ["r1", "r2", "r3"]
    readings = {name: reading() for name in names}
    assert soak.verdicts_in_sync(readings, names, since=100.0, now=106.0)
    # one node not in sync, or not read yet
    assert not soak.verdicts_in_sync({**readings, "r3": reading("degraded")},
                                     names, since=100.0, now=106.0)
    assert not soak.verdicts_in_sync({"r1": reading(), "r2": reading()}, names,
                                     since=100.0, now=106.0)
    # a reading from before the fault ended says nothing about after it
    assert not soak.verdicts_in_sync({**readings, "r2": reading(taken=99.0)},
                                     names, since=100.0, now=106.0)
    # a poller that stopped reading: its last verdict is not the node's now
    assert not soak.verdicts_in_sync({**readings, "r2": reading(taken=103.9)},
                                     names, since=100.0, now=106.0, fresh=2.0)


def client_flow(flow_id, last, error=None, echoed=("203.0.113.10:40001",)):
    return {"flow_id": flow_id, "protocol": flow_id[:3], "error": error,
            "replies": 10, "last_reply_at": last,
            "echoed_public_endpoints": list(echoed)}


def test_a_flow_is_lost_by_an_error_a_second_endpoint_or_silence():
    client = {"flows": [
        client_flow("tcp-00", 50.0),
        client_flow("tcp-01", 50.0, error="ConnectionResetError"),
        client_flow("udp-00", 50.0),
        client_flow("udp-01", 20.0),
        client_flow("udp-02", None),
        client_flow("udp-03", 50.0, echoed=("203.0.113.10:1", "203.0.113.10:2")),
    ]}
    server = {"flows": [
        {"flow_id": "tcp-00", "public_endpoints": ["203.0.113.10:40001"]},
        {"flow_id": "udp-00", "public_endpoints": ["203.0.113.10:40001",
                                                   "203.0.113.10:1024"]},
    ]}
    assert soak.lost_flows(client, server, since=30.0) == [
        "tcp-01", "udp-00", "udp-01", "udp-02", "udp-03"]
    assert soak.silent_flows(client, since=30.0) == ["udp-01", "udp-02"]
    assert soak.loss_reasons(client, server, {"tcp-01", "udp-00", "udp-01", "udp-03"},
                             since=30.0) == {
        "tcp-01": "ConnectionResetError", "udp-00": "new public port",
        "udp-01": "silent", "udp-03": "new public port"}
    assert soak.lost_flows({"flows": [client_flow("tcp-00", 50.0)]}, server,
                           since=30.0) == []


def test_entries_lost_against_what_the_primary_held():
    assert soak.entries_lost(1000, 1000) == 0
    assert soak.entries_lost(1000, 1200) == 0  # churn that looks idle is not a gain
    assert soak.entries_lost(1000, 990) == 10
    assert soak.entries_lost(1000, None) == 1000  # no primary to read
    # right after the fault, and once settled: the worst count
    assert soak.entries_lost(1000, 1000, 400) == 600
    assert soak.entries_lost(1000, 400, 1000) == 600
    assert soak.entries_lost(1000, 1000, None) == 1000


def test_a_lost_flow_is_told_with_when_it_went_silent():
    client = {"started_at": 1000.0, "flows": [
        client_flow("tcp-00", 50.0), client_flow("tcp-02", 197.5),
        client_flow("udp-01", 196.0)]}
    moments = soak.soak_moments(client, {"tcp-02", "udp-01"}, 1002.0)
    assert moments == {"tcp-02": 195.5, "udp-01": 194.0}
    reasons = {"tcp-02": "ConnectionResetError", "udp-01": "new public port"}
    assert soak.describe_losses(moments, reasons) == (
        "udp-01 new public port 194.0 s, tcp-02 ConnectionResetError 195.5 s")


def outcome(kind="sighup", before="r1", after="r1", lost=(), held=100, in_sync=2.0,
            problems=()):
    return soak.Outcome(soak.Fault(kind, 30.0), 31.0, before, after, 32, tuple(lost),
                        100, held, in_sync, tuple(problems), held)


def test_the_last_line_counts_failovers_flows_once_and_entries():
    outcomes = [outcome(),
                outcome("crash-flushed", "r1", "r2", lost=("tcp-03",), held=97),
                outcome("switchover", "r2", "r1", lost=("tcp-03", "udp-01"))]
    assert soak.summary(outcomes) == (3, 2, 2, 3)
    assert soak.summary_line(outcomes) == (
        "3 faults, 2 failovers, 2 flows lost, 3 entries lost")
    assert soak.exit_status(outcomes) == 1


def test_exit_status_zero_only_when_nothing_was_lost_and_all_settled():
    assert soak.exit_status([outcome(), outcome("crash-keep-table", "r1", "r2")]) == 0
    assert soak.exit_status([outcome(held=99)]) == 1
    assert soak.exit_status([outcome(lost=("udp-00",))]) == 1
    assert soak.exit_status([outcome(in_sync=None)]) == 1
    assert soak.exit_status([outcome(problems=("r2: 2 conntrackd",))]) == 1
    assert soak.exit_status([]) == 0


def test_a_table_that_shrank_after_the_fault_is_shown_and_counted():
    shrank = soak.Outcome(soak.Fault("partition", 50.0, seconds=7.3), 300.0, "r2",
                          "r1", 32, (), 50000, 50000, 17.5, (), 4047)
    assert soak.row(shrank)[5] == "50000 then 4047/50000"
    assert shrank.entries_lost == 45953
    assert soak.summary([shrank]) == (1, 1, 0, 45953)


def test_a_row_says_what_the_fault_did():
    partition = soak.Outcome(soak.Fault("partition", 50.0, seconds=4.2), 52.0,
                             "r1", "r2", 32, ("tcp-00",), 100, 100, None,
                             ("r2: degraded: resyncing",), 100)
    assert soak.row(partition) == (
        "partition 4.2s", "primary", "52 s", "r1->r2", "31/32", "100/100", "no",
        "r2: degraded: resyncing")
    line = soak.format_row(soak.row(outcome()))
    assert line.split() == ["sighup", "primary", "31", "s", "no", "32/32", "100/100",
                            "2.0", "s", "-"]


def test_storm_states_end_with_the_nodes_role():
    states = soak.storm_states(4)
    assert len(states) == soak.STORM_HOOKS and states[-1] == "BACKUP"
    assert set(states) == {"MASTER", "BACKUP"}
    assert soak.storm_states(4) == states


def test_every_kind_has_an_effect():
    assert set(soak.EFFECTS) == set(soak.KINDS)


def test_churn_pays_what_the_rate_owes_without_bursting():
    assert churn.datagrams_due(2000, 0.5, 0) == 400  # capped: 0.2 s worth
    assert churn.datagrams_due(2000, 0.5, 900) == 100
    assert churn.datagrams_due(2000, 0.5, 1000) == 0
    assert churn.datagrams_due(2000, 0.5, 1200) == 0
    assert churn.datagrams_due(1, 10.0, 0) == 1
