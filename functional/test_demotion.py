"""A preempting node that returns does not take the router back until its replica
is complete ([failover] demote_while_resyncing), and does take it back after.

keepalived here preempts (not Neutron's nopreempt): r1 has priority 150, r2 100,
so r1 takes the addresses back as soon as it runs again. Each node runs its
daemon (checks every 0.5 s) and keepalived with the track_file lines `router
add` printed (weight -100). r1 is loaded with 50,000 idle entries and r2's
replica follows; then r1 dies keeping its namespace and table, r2 takes over,
and r1 returns (daemon, then keepalived). As backup in warm standby r1 empties
its table and asks r2 for all of it; to keep the resync incomplete for a window
a test can see, every sync packet on r2's HA leg is dropped for HOLD seconds
after the return, and so are the table transfer's TCP segments (r1's request to
r2's daemon times out and falls back to conntrackd's resync, which the same
rules hold back; VRRP and the daemons' UDP reports pass), then the rules go and
the resync completes (FTFW, and the daemon's stall repair). Sampled every
0.1 s: who holds the VIP, r1's demotion file, r1's replica, r2's table.

With the option on, r1 must stay backup (r2 keeping the VIP, r1's file 1) for
the whole hold, and take the VIP only once its file went 0, with its replica
complete. The negative control, option off, same keepalived: r1 takes the VIP
back during the hold with its replica nowhere near complete.
"""

import dataclasses
import json
import time

from snat_sync import health
from snat_sync.lab import demo
from snat_sync.lab import nodes as nodes_module
from snat_sync.lab import topology as lab_module

ENTRIES = 50_000
HOLD = 8.0  # seconds the resync is held back after r1's return
SYNC_BASE_PORT = 3780  # [conntrackd] base_port's default
TABLE_BASE_PORT = 4780  # [health] base_port's default: the table transfer's
WEIGHT = -100


def write_config(path, demote):
    return nodes_module.write_config(
        path, extra=(
            "[health]\ncheck_interval = 0.5\nrepair_after = 2\nrepair_backoff = 2\n"
            "[failover]\n"
            f"demote_while_resyncing = {str(demote).lower()}\n"
            f"demotion_weight = {WEIGHT}\ndemotion_timeout = 60\n"))


def track_file_lines(snippet):
    """The global track_file block and the instance's track_file block of the
    snippet `router add` printed, as keepalived config lines."""
    lines = snippet.splitlines()
    start = next(index for index, line in enumerate(lines)
                 if line.startswith("track_file "))
    end = lines.index("}", start)
    inner = lines.index("    track_file {")
    inner_end = lines.index("    }", inner)
    return tuple(lines[start:end + 1]), tuple(lines[inner:inner_end + 1])


def router_add_answer(lab, node):
    """`router add --json` again (it changes nothing): what it prints."""
    result = lab_module.snat_sync(
        node.state_path, *node.global_arguments, "router", "add", lab.router_id,
        "--namespace", node.router.namespace, "--ha-interface",
        node.router.ha.device, "--local-address", node.router.ha_address,
        "--peer-address", node.router.peer_ha_address, "--vrid", lab.vrid, "--json")
    return json.loads(result.stdout)


def hold_sync(router, port, table_port, action):
    """Add (-A) or delete (-D) rules that drop every sync packet and every table
    transfer segment on router's HA leg, in and out."""
    for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
        for protocol, held_port in (("udp", port), ("tcp", table_port)):
            lab_module.run(["iptables", action, chain, direction, router.ha.device,
                            "-p", protocol, "-m", "multiport", "--ports",
                            str(held_port), "-j", "DROP"], namespace=router.namespace)


@dataclasses.dataclass
class Sample:
    at: float  # seconds since r1's return
    vip: str | None  # the router holding the VIP
    demotion: str | None  # r1's demotion file
    replica: int  # r1's kernel table
    table: int  # r2's kernel table


def sample(lab, demotion_file, returned):
    r1, r2 = lab.routers
    holder = lab_module.primary(lab)
    try:
        demotion = demotion_file.read_text().strip()
    except OSError:
        demotion = None
    return Sample(time.monotonic() - returned, holder.name if holder else None,
                  demotion, lab_module.kernel_entry_count(r1),
                  lab_module.kernel_entry_count(r2))


def run_return(lab, tmp_path, demote):
    """The scenario; returns (samples, seconds from return to the hold's end)."""
    r1, r2 = lab.routers
    for router in lab.routers:
        router.preempt = True
    configs = {router.name: write_config(tmp_path / f"{router.name}.conf", demote)
               for router in lab.routers}
    nodes = {router.name: nodes_module.add_node(lab, router, tmp_path / router.name,
                                                configs[router.name])
             for router in lab.routers}
    if demote:
        for name, node in nodes.items():
            answer = router_add_answer(lab, node)
            demotion_file = node.state_path / "routers" / lab.router_id / "demotion"
            assert f'file "{demotion_file}"' in answer["keepalived_snippet"]
            (node.router.keepalived_global_lines,
             node.router.keepalived_instance_lines) = track_file_lines(
                answer["keepalived_snippet"])
            assert f"    weight {WEIGHT}" in node.router.keepalived_global_lines
    for node in nodes.values():
        nodes_module.start_daemon(lab, node)
    demo.start_keepalived_pair(
        lab, {name: node.notify_command for name, node in nodes.items()},
        {name: node.state_path for name, node in nodes.items()})
    assert lab_module.load_idle_entries(r1, ENTRIES, tmp_path) == ENTRIES
    assert lab_module.wait_until(
        lambda: lab_module.kernel_entry_count(r2) >= ENTRIES, 30, interval=0.2), \
        lab_module.kernel_entry_count(r2)
    r1_demotion = nodes["r1"].state_path / "routers" / lab.router_id / "demotion"
    r2_demotion = nodes["r2"].state_path / "routers" / lab.router_id / "demotion"
    if demote:  # r2, backup with a complete replica, is not demoted
        assert lab_module.wait_until(
            lambda: r2_demotion.read_text().strip() == "0", 10), \
            r2_demotion.read_text()
        assert r1_demotion.read_text().strip() == "0"  # primary

    nodes_module.die_keeping_table(lab, nodes["r1"])
    lab_module.wait_for_primary(lab, r2)
    port, table_port = SYNC_BASE_PORT + lab.vrid, TABLE_BASE_PORT + lab.vrid
    hold_sync(r2, port, table_port, "-A")
    held = True
    samples = []
    try:
        nodes_module.return_node(lab, nodes["r1"])
        returned = time.monotonic()
        while time.monotonic() - returned < HOLD:
            samples.append(sample(lab, r1_demotion, returned))
            time.sleep(0.1)
        hold_sync(r2, port, table_port, "-D")
        held = False
        released = time.monotonic() - returned
        while time.monotonic() - returned < HOLD + 30:
            samples.append(sample(lab, r1_demotion, returned))
            if samples[-1].vip == "r1" and (not demote
                                            or samples[-1].demotion == "0"):
                # a few more, to see it stays
                for _ in range(10):
                    time.sleep(0.1)
                    samples.append(sample(lab, r1_demotion, returned))
                break
            time.sleep(0.1)
    finally:
        if held:
            hold_sync(r2, port, table_port, "-D")
    return samples, released


def describe(samples):
    changes, last = [], None
    for each in samples:
        key = (each.vip, each.demotion)
        if key != last:
            changes.append(f"{each.at:.1f}s vip={each.vip} demotion={each.demotion} "
                           f"replica={each.replica} table={each.table}")
            last = key
    return changes


def test_a_returning_node_is_demoted_until_its_replica_is_complete(lab, tmp_path):
    samples, released = run_return(lab, tmp_path, demote=True)
    print("\n" + "\n".join(describe(samples)))
    during = [each for each in samples if each.at < released]
    assert during, samples
    # the whole hold: r2 primary, r1 demoted, r1's replica incomplete
    assert all(each.vip == "r2" for each in during), describe(samples)
    assert all(each.demotion == "1" for each in during if each.at > 1.0), \
        describe(samples)
    # r1's old table until its BACKUP transition empties it, then short
    emptied = next((index for index, each in enumerate(during)
                    if health.is_short(each.replica, each.table, 1.0)), None)
    assert emptied is not None, during[-3:]
    assert all(health.is_short(each.replica, each.table, 1.0)
               for each in during[emptied:]), during
    # then r1 takes over, only once it is no longer demoted, with its replica whole
    taken = next((each for each in samples if each.vip == "r1"), None)
    assert taken is not None, describe(samples)
    lifted = next(each for each in samples if each.at >= released
                  and each.demotion == "0")
    assert lifted.at <= taken.at, describe(samples)
    assert not health.is_short(lifted.replica, lifted.table, 1.0), lifted
    assert taken.replica >= ENTRIES - 16, taken
    print(f"r1's table emptied {during[emptied].at:.1f} s after its return; "
          f"replica at the hold's end {during[-1].replica} of {during[-1].table}")
    print(f"r1 demoted {lifted.at:.1f} s after its return (hold {released:.1f} s, "
          f"lifted {lifted.at - released:.1f} s after it) with {lifted.replica} of "
          f"{lifted.table} entries; took the VIP {taken.at - lifted.at:.1f} s later "
          f"with {taken.replica} entries")


def test_without_the_option_a_returning_node_takes_over_with_a_partial_replica(
        lab, tmp_path):
    samples, released = run_return(lab, tmp_path, demote=False)
    print("\n" + "\n".join(describe(samples)))
    taken = next((each for each in samples if each.vip == "r1"), None)
    assert taken is not None, describe(samples)
    assert taken.at < released, describe(samples)
    assert health.is_short(taken.replica, taken.table, 1.0), taken
    assert all(each.demotion is None for each in samples)
    print(f"r1 took the VIP {taken.at:.1f} s after its return with {taken.replica} "
          f"of {taken.table} entries")
