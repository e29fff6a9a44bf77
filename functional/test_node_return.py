"""Nodes that leave and return (issue 12): a returning node's table is the primary's
before it can be primary again, and flows survive the next failover.

Each node runs `snat-sync daemon` with its own state path and config, keepalived
notifies it, r1 holds 50,000 idle entries and 16 TCP + 16 UDP flows run through it.

Rolling restart: r1's node stops dead keeping its namespace and kernel table
(nodes.die_keeping_table); just before, while its conntrackd is frozen, r1 gets an
entry nobody replicates (STALE) and a sample of idle entries gets a mark r2 never
hears of (their "r1 version"). r2 takes over; 2 s after the VIP moved r1 returns
(ports up, daemon, then keepalived: BACKUP, nopreempt, r2 stays primary); 2 s after
r1's table is complete (at most 10 s after the return) r2's node crashes and r1
takes over again. With the repair (the default) r1's table
after the return holds exactly r2's entries; with `resync_on_backup = false` (the
negative control) STALE and the r1 version survive the return.

Partition: r1 (primary) stops hearing and being heard on its HA leg for 5 s with
every process alive (iptables drops; a switch port down would be carrier loss,
and keepalived would go FAULT and give the VIPs up): r2 takes over, two primaries
for a moment; the heal leaves r1 primary (priority 150 over 100); r2's table must
then be r1's, and flows must survive r1's crash. The heal lets r1's adverts out
first, so r2 yields before r1 hears it: keepalived on r1 sends no gratuitous ARP,
and the switch keeps sending the shared MACs to r2 until r1's daemon sees r2's
report and announces its addresses (snat_sync.announce). r2 carried the flows for a
few seconds, so r1's own entries are behind them when the flows come back to it:
only liberal TCP tracking ([failover] liberal_tcp_tracking, snat_sync.tcp_tracking)
keeps their segments valid, and NATed.
"""

import contextlib
import dataclasses
import time

import pytest

from snat_sync.lab import demo
from snat_sync.lab import nodes
from snat_sync.lab.rolling import holds
from snat_sync.lab import topology as lab_module

IDLE_ENTRIES = 50_000
FLOWS = 16
# An entry only r1 ever has: inserted while its conntrackd is frozen.
STALE = lab_module.SnatEntry("tcp", "10.99.0.1", 1234, 50123,
                             server_address="198.18.0.1")
# The idle entries of this client (250 of them) get this mark on r1 alone.
SAMPLE_CLIENT = "10.200.0.5"
R1_MARK = 42
RETURN_AFTER = 2.0  # seconds after the VIP moved to r2
SECOND_CRASH_AFTER = 10.0  # seconds after r1 returned, at the latest
SETTLED_FOR = 2.0  # seconds r1's table stays complete before r2 crashes
RUN_AFTER_LAST_FAILOVER = 10.0  # TCP's retry 6.2 s after the loss, then a reply
FAILOVER_ALLOWANCE = 4.5


@dataclasses.dataclass
class Observed:
    results: list
    failure_at: float  # on the flows' clock
    stale_on_r1: bool  # after the return, just before r2 crashed
    stale_on_r2: bool
    r1_marked: int  # sample entries on r1 still carrying r1's own mark
    complete_after: float | None  # seconds from return until r1's table was r2's
    only_r1: set
    only_r2: set
    timeline: list


def lost(observed):
    return [result.flow_id for result in observed.results
            if not (result.alive and result.same_public_endpoint)]


def marked(router, mark=R1_MARK):
    result = lab_module.run(["conntrack", "-L", "-s", SAMPLE_CLIENT, "-m", str(mark)],
                            namespace=router.namespace, check=False)
    return sum(1 for line in result.stdout.splitlines() if line[:1].isalpha())


def sample_difference(r1, r2):
    """Entries of two samples (the flows, the marked client) one node holds and the
    other does not."""
    keys = {router.name: set() for router in (r1, r2)}
    for filters in (("-d", lab_module.SERVER_ADDRESS), ("-s", SAMPLE_CLIENT)):
        for router in (r1, r2):
            keys[router.name] |= nodes.table_keys(router, *filters)
    return keys["r1"] - keys["r2"], keys["r2"] - keys["r1"]


def wait_for_vip(lab, router, timeout=15):
    if not lab_module.wait_until(lambda: lab_module.primary(lab) is router, timeout):
        raise lab_module.LabError(f"{router.name} did not take the VIPs")


def started_lab(stack, tmp_path, resync_on_backup, client_duration, extra=""):
    """A lab with both nodes' daemons and keepalived (extra: more of their
    configuration), the idle entries on r1 and on r2, the flows running. Returns
    (lab, nodes, client, server)."""
    lab = stack.enter_context(lab_module.running_lab(tmp_path / "lab"))
    configs = {name: nodes.write_config(tmp_path / f"{name}.conf", resync_on_backup,
                                        extra)
               for name in ("r1", "r2")}
    started = nodes.start_nodes(lab, tmp_path, configs)
    r1, r2 = lab.routers
    loaded = lab_module.load_idle_entries(r1, IDLE_ENTRIES, tmp_path)
    assert loaded == IDLE_ENTRIES
    assert lab_module.wait_until(
        lambda: lab_module.kernel_entry_count(r2) >= IDLE_ENTRIES, 30, 0.2), (
        "r2 never held the idle entries")
    settings = demo.ScenarioSettings(flows=FLOWS, crash_after=0,
                                     run_after_crash=client_duration)
    server = demo.start_server(lab, tmp_path, client_duration + 10)
    client = demo.start_client(lab, tmp_path, settings)
    return lab, started, client, server


def rolling_restart(tmp_path, resync_on_backup, flush, second_crash=True):
    """The roll (module docstring); without second_crash it stops once r1's table
    after the return has been looked at (what the negative control judges)."""
    duration = 4 + FAILOVER_ALLOWANCE + RETURN_AFTER + SECOND_CRASH_AFTER + 3 \
        + FAILOVER_ALLOWANCE + RUN_AFTER_LAST_FAILOVER
    timeline = []
    with contextlib.ExitStack() as stack:
        lab, started, client, server = started_lab(stack, tmp_path, resync_on_backup,
                                                   duration)
        r1, r2 = lab.routers
        clock = time.monotonic()

        def note(what):
            timeline.append((round(time.monotonic() - clock, 2), what))

        time.sleep(4)

        def while_frozen():
            lab_module.insert_entry(r1, STALE)
            lab_module.run(["conntrack", "-U", "-p", "tcp", "-s", SAMPLE_CLIENT,
                            "-m", str(R1_MARK)],
                           namespace=r1.namespace, check=False)

        failure_at = time.time()
        nodes.die_keeping_table(lab, started["r1"], while_frozen)
        note("r1 died")
        assert holds(r1, STALE) and not holds(r2, STALE)
        assert marked(r1) > 0 and marked(r2) == 0
        wait_for_vip(lab, r2)
        note("r2 primary")
        expected = lab_module.kernel_entry_count(r2)
        time.sleep(RETURN_AFTER)
        nodes.return_node(lab, started["r1"], flush=flush)
        returned = time.monotonic()
        note("r1 returned")
        complete_after = None
        while time.monotonic() - returned < SECOND_CRASH_AFTER:
            if (complete_after is None and not holds(r1, STALE)
                    and lab_module.kernel_entry_count(r1) >= expected - 2):
                complete_after = round(time.monotonic() - returned, 2)
                note("r1's table complete")
            if (complete_after is not None
                    and time.monotonic() - returned >= complete_after + SETTLED_FOR):
                break
            time.sleep(0.2)
        stale_on_r1, stale_on_r2 = holds(r1, STALE), holds(r2, STALE)
        r1_marked = marked(r1)
        only_r1, only_r2 = sample_difference(r1, r2)
        assert lab_module.primary(lab) is r2, "r2 should have stayed primary"
        if second_crash:
            nodes.crash_node(lab, started["r2"])
            note("r2 crashed")
            wait_for_vip(lab, r1)
            note("r1 primary")
            left = duration - (time.monotonic() - clock)
            assert left >= RUN_AFTER_LAST_FAILOVER - 1, (
                f"the flows end {left:.1f} s after the last failover: {timeline}")
            time.sleep(RUN_AFTER_LAST_FAILOVER)
        results, started_at = demo.stop_flows(tmp_path, client, server)
    return Observed(results, failure_at - started_at, stale_on_r1, stale_on_r2,
                    r1_marked, complete_after, only_r1, only_r2, timeline)


def describe(observed):
    return (f"lost {lost(observed)}; stale on r1 {observed.stale_on_r1}, on r2 "
            f"{observed.stale_on_r2}; r1-marked {observed.r1_marked}; complete after "
            f"{observed.complete_after} s; only r1 {sorted(observed.only_r1)[:3]}, "
            f"only r2 {sorted(observed.only_r2)[:3]}; {observed.timeline}")


def assert_alive_before_the_failure(observed):
    dead = [result.flow_id for result in observed.results
            if not result.was_alive_at(observed.failure_at)]
    assert not dead, f"flows not alive before the first failure: {dead}"
    assert len(observed.results) == 2 * FLOWS


@pytest.mark.parametrize("repair", [True, False], ids=["repair-on", "repair-off"])
def test_rolling_restart_with_the_old_table(tmp_path, repair):
    """Without the repair (the negative control) r1 keeps its old version after
    the return, which is what the control looks at: it stops before r2's crash."""
    observed = rolling_restart(tmp_path, resync_on_backup=repair, flush=False,
                               second_crash=repair)
    report = describe(observed)
    print(report)
    assert_alive_before_the_failure(observed)
    if repair:
        assert not lost(observed), report
        assert not observed.stale_on_r1 and not observed.stale_on_r2, report
        assert observed.r1_marked == 0, report
        assert not observed.only_r1 and not observed.only_r2, report
        assert observed.complete_after is not None, report
    else:
        assert observed.stale_on_r1 or observed.r1_marked, report


def test_rolling_restart_after_a_reboot_keeps_every_flow(tmp_path):
    """The table comes back empty (a reboot): the resync refills it."""
    observed = rolling_restart(tmp_path, resync_on_backup=True, flush=True)
    report = describe(observed)
    print(report)
    assert_alive_before_the_failure(observed)
    assert not lost(observed), report
    assert not observed.stale_on_r1 and not observed.only_r1 and not observed.only_r2, (
        report)
    assert observed.complete_after is not None, report


PARTITION = 5.0
AFTER_HEAL = 8.0


HA_CHAINS = (("INPUT", "-i"), ("OUTPUT", "-o"))
BACK_WITHIN = 5.0  # seconds after the heal the UDP flows reply again


def ha_drop(router, action, chains=HA_CHAINS):
    for chain, direction in chains:
        lab_module.run(["iptables", action, chain, direction, router.ha.device,
                        "-j", "DROP"], namespace=router.namespace)


def back_after_heal(results, healed_at):
    """Seconds from the heal until each UDP flow's first reply after it (None if
    none came), on the flows' clock."""
    return {result.flow_id: min((at - healed_at for at in result.reply_times
                                 if at > healed_at), default=None)
            for result in results if result.protocol == "udp"}


@pytest.mark.parametrize("repair", [True, False], ids=["repair-on", "repair-off"])
def test_partition_heal(tmp_path, repair):
    duration = 4 + PARTITION + AFTER_HEAL + 2 + FAILOVER_ALLOWANCE \
        + RUN_AFTER_LAST_FAILOVER
    only_r2_entry = lab_module.SnatEntry("tcp", "10.99.0.2", 1234, 50124,
                                         server_address="198.18.0.2")
    with contextlib.ExitStack() as stack:
        # The control turns the daemon's repairs off too: the survivor's resync,
        # and its gratuitous ARPs (snat_sync.announce).
        health = "[health]\ncheck_interval = 1\n" + (
            "" if repair else "repair = false\n")
        lab, started, client, server = started_lab(stack, tmp_path, repair, duration,
                                                   health)
        r1, r2 = lab.routers
        clock = time.monotonic()
        time.sleep(4)
        failure_at = time.time()
        ha_drop(r1, "-I")
        cut = time.monotonic()
        assert lab_module.wait_until(lambda: lab_module.has_vip(r2), 15)
        both = lab_module.has_vip(r1)
        # What r2 does as a primary alone: a connection r1 never sees, and a
        # change to entries r1 has.
        lab_module.insert_entry(r2, only_r2_entry)
        lab_module.run(["conntrack", "-U", "-p", "tcp", "-s", SAMPLE_CLIENT,
                            "-m", str(R1_MARK)],
                       namespace=r2.namespace, check=False)
        time.sleep(max(0.0, PARTITION - (time.monotonic() - cut)))
        # r2 hears r1 first and yields at once, unheard: r1 never hears an advert
        # of lower priority, so keepalived sends no gratuitous ARP, and the switch
        # still sends the routers' shared MACs to r2.
        ha_drop(r1, "-D", chains=[("OUTPUT", "-o")])
        assert lab_module.wait_until(lambda: not lab_module.has_vip(r2), 5)
        ha_drop(r1, "-D", chains=[("INPUT", "-i")])
        healed = time.monotonic()
        healed_at = time.time()
        assert lab_module.wait_until(lambda: lab_module.primary(lab) is not None, 10)
        survivor = lab_module.primary(lab)
        other = r2 if survivor is r1 else r1
        expected = lab_module.kernel_entry_count(survivor)
        complete_after = None
        while time.monotonic() - healed < AFTER_HEAL:
            if (complete_after is None
                    and lab_module.kernel_entry_count(other) >= expected - 2):
                complete_after = round(time.monotonic() - healed, 2)
            time.sleep(0.2)
        only_r1, only_r2 = sample_difference(r1, r2)
        entry_on = (holds(r1, only_r2_entry), holds(r2, only_r2_entry))
        marks = (marked(r1), marked(r2))
        if repair:  # the control is judged on the tables alone
            nodes.crash_node(lab, started[survivor.name])
            wait_for_vip(lab, other)
            left = duration - (time.monotonic() - clock)
            assert left >= RUN_AFTER_LAST_FAILOVER - 1, f"flows end {left:.1f} s after"
            time.sleep(RUN_AFTER_LAST_FAILOVER)
        results, started_at = demo.stop_flows(tmp_path, client, server)
    observed = Observed(results, failure_at - started_at, False, False, 0,
                        complete_after, only_r1, only_r2, [])
    back = back_after_heal(results, healed_at - started_at)
    silent = sorted(flow for flow, after in back.items()
                    if after is None or after > BACK_WITHIN)
    longest = max((after for after in back.values() if after is not None),
                  default=None)
    report = (f"two primaries {both}; {survivor.name} survived the heal; "
              f"UDP back after the heal in at most {longest} s, silent for over "
              f"{BACK_WITHIN} s: {silent}; "
              f"{other.name} complete after {complete_after} s; r2-only entry on "
              f"r1/r2 {entry_on}; marked r1/r2 {marks}; lost {lost(observed)}; "
              f"only r1 {sorted(only_r1)[:3]}, only r2 {sorted(only_r2)[:3]}")
    print(report)
    assert_alive_before_the_failure(observed)
    assert both, "no split brain: r1 gave the VIPs up"
    assert survivor is r1, report
    if repair:
        assert not lost(observed), report
        assert not silent, report  # r1 announced its addresses
        assert not only_r1 and not only_r2, report
        # The nodes agree. On whose version depends on a race: FTFW may resend
        # r2's partition-time messages to the survivor when the link heals,
        # before r2's backup transition forgets them (seen in 1 CI run of 3;
        # in the others r2's work was gone from both).
        assert entry_on[0] == entry_on[1] and marks[0] == marks[1], report
    else:
        # Without the repairs nothing tells the switch where the MACs are now.
        assert silent, report
        # Without the flush and resync r2's partition-time work stays: on r2
        # alone, or carried into the survivor's table by FTFW's resends after the
        # heal (the nodes then agree, but on the version of the node that lost).
        assert (only_r1 or only_r2 or entry_on != (False, False)
                or marks != (0, 0)), report
