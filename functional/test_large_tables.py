"""A crash of the primary with 200,000 idle SNAT entries in its table.

(The empty table's cold crash is test_failover's; 100,000 entries, between the
two, is bench/failover_gap.py's: CI time.)

The failover cases run in cold standby: what they measure is the commit at
failover and the guard (warm standby's takeover commits nothing; test_warm_standby
crashes it at 200,000 entries). The idle entries are loaded on r1 before the live flows start, and the crash waits
until r2's conntrackd holds every one of them. A large table makes the commit at
failover long (about 0.5 s per 100,000 entries, several times that on a busy
machine); the reset-window guard drops, never resets, the live flows' packets
meanwhile, and TCP's retransmission backoff (retries 3.0, 6.2 and 12.6 s after the
first loss) decides when they resume, so the large cases run longer after the crash.
Each case takes 25 to 50 s.
"""

import contextlib
import re
import time

import pytest

from snat_sync.lab import demo
from snat_sync.lab import topology as lab_module

from functional.test_failover import describe

LIVE_FLOWS = 16
IDLE_CLIENT_PREFIX = "src=10.200.0."  # lab_module.idle_entry's client addresses


def standby_config(tmp_path, standby_mode, extra=""):
    config = tmp_path / f"{standby_mode}.conf"
    config.write_text(f"[failover]\nstandby_mode = {standby_mode}\n"
                      "[metrics]\nlisten_port = 0\n" + extra)
    config.chmod(0o600)
    return config


@pytest.mark.parametrize("idle_entries", [200_000])
def test_failover_with_large_table(tmp_path, idle_entries):
    settings = demo.ScenarioSettings(
        flows=LIVE_FLOWS,
        idle_entries=idle_entries,
        run_after_crash=16.0 if idle_entries else 10.0,
        snat_sync_arguments=("--config-file",
                             str(standby_config(tmp_path, "cold"))),
    )
    result = demo.run_scenario(tmp_path, with_snat_sync=True, settings=settings)
    print(measurements(result))

    assert result.idle_entries_loaded == idle_entries, (
        f"only {result.idle_entries_loaded} of {idle_entries} idle entries got into "
        "r1's table (nf_conntrack_max?)")
    broken = [flow for flow in result.flows if not flow.alive]
    assert not broken, f"flows lost despite snat-sync:\n{describe(broken)}"
    moved = [flow for flow in result.flows if not flow.same_public_endpoint]
    assert not moved, f"flows seen from another public address:port:\n{describe(moved)}"
    assert result.summary.tcp_alive == result.summary.tcp_total == LIVE_FLOWS
    assert result.summary.udp_alive_same_endpoint == result.summary.udp_total == LIVE_FLOWS

    transition = result.last_transition
    assert transition["role"] == "primary" and transition["outcome"] == "done", transition
    assert not transition["errors"], transition
    assert [step["name"] for step in transition["steps"]][:2] == [
        "commit", "lift-guard"], transition
    commit = transition["commit"]
    assert commit["failed"] == 0, commit
    assert commit["expected"] >= idle_entries + 2 * LIVE_FLOWS, commit
    assert commit["committed"] + commit["already_present"] == commit["expected"], commit
    assert result.new_primary_status["replication"]["cache_full_drops"] == 0, (
        result.new_primary_status)
    assert result.new_primary_kernel_entries >= idle_entries + 2 * LIVE_FLOWS, (
        result.new_primary_kernel_entries)


@pytest.mark.parametrize("standby_mode", ["warm", "cold"])
def test_events_lost_on_the_primary_still_replicate(lab, tmp_path, state_paths,
                                                    standby_mode):
    """r1's conntrackd is frozen while 200,000 entries are loaded, so its netlink
    event buffer overruns and the kernel drops most events. conntrackd then re-reads
    the table after netlink_overrun_resync seconds and sends it all at once, which
    must fit its resend queue: r2 ends up with every entry, in its replica where
    its standby mode keeps it (warm: its kernel table; cold: its external cache).

    That the overrun happened is asserted first (conntrackd's own netlink counters).
    The buffer is set to 64 MB (about 52,000 events): the default, 512 MB, holds
    all 200,000 events and this would be a plain replication test."""
    config = standby_config(tmp_path, standby_mode,
                            "[conntrackd]\nnetlink_buffer_size = 67108864\n"
                            "netlink_buffer_max_size = 134217728\n")
    demo.start_routers(lab, tmp_path, True, demo.ScenarioSettings(
        snat_sync_arguments=("--config-file", str(config))))
    r1 = lab.routers[0]
    r1_config = state_paths["r1"] / "routers" / lab.router_id / "conntrackd.conf"
    frozen = lab_module.named_processes_in_namespace(r1.namespace, "conntrackd")
    started = time.monotonic()
    for process in frozen:
        process.suspend()
    try:
        loaded = lab_module.load_idle_entries(r1, 200_000, tmp_path)
    finally:
        for process in frozen:
            with contextlib.suppress(Exception):
                process.resume()
    netlink = {}

    def overran():
        netlink.update(netlink_stats(r1, r1_config))
        return netlink.get("netlink overrun", 0) >= 1

    assert lab_module.wait_until(overran, timeout=15, interval=0.5), (
        f"r1's conntrackd saw no netlink overrun: {netlink}; its log: "
        + lab_module.read_tail(r1_config.parent / "conntrackd.log"))
    assert netlink["events received"] < loaded, (
        f"r1's conntrackd received all {loaded} events: none was lost ({netlink})")
    status = {}

    r2 = lab.routers[1]

    def replicated():
        status.update(lab_module.snat_sync_status(state_paths["r2"], lab.router_id)[0])
        if standby_mode == "warm":
            # a cheap count first (it includes r2's own few entries), then the
            # idle entries themselves
            return (lab_module.kernel_entry_count(r2) >= loaded
                    and idle_entries_in_kernel(r2) >= loaded)
        return status["external_cache"] >= loaded

    assert lab_module.wait_until(replicated, timeout=40, interval=0.5), (
        loaded, status, lab_module.snat_sync_status(state_paths["r1"], lab.router_id))
    print(f"overrun [{standby_mode}]: {loaded} entries on r2 after "
          f"{time.monotonic() - started:.1f} s")
    assert loaded == 200_000
    assert status["replication"]["cache_full_drops"] == 0, status


def idle_entries_in_kernel(router):
    """How many of the lab's idle entries router's kernel table holds."""
    return sum(IDLE_CLIENT_PREFIX in line for line in lab_module.kernel_entries(router))


def netlink_stats(router, conntrackd_config):
    """conntrackd's netlink counters (`-s runtime`), e.g. {"netlink overrun": 1,
    "events received": 97768}. conntrackd counts an overrun each time the kernel
    answers its event socket with ENOBUFS: the buffer was full, events were dropped."""
    output = lab_module.run(["conntrackd", "-C", str(conntrackd_config), "-s",
                             "runtime"], namespace=router.namespace).stdout
    return {match.group(1): int(match.group(2)) for match in re.finditer(
        r"^\s*(events received|netlink overrun|resync with kernel table):\s*(\d+)",
        output, re.MULTILINE)}


def measurements(result):
    """One line of figures for the log (pytest -s shows it)."""
    transition = result.last_transition or {}
    steps = {step["name"]: step for step in transition.get("steps", [])}
    commit = transition.get("commit") or {}
    guard_up = None
    if "lift-guard" in steps:
        lift = steps["lift-guard"]
        guard_up = lift["started"] + lift["duration_ms"] / 1000 - transition["arrived"]
    summary = result.summary
    replication = result.idle_replication_seconds
    return (
        f"idle={result.idle_entries_loaded} "
        f"replicated_in={replication if replication is None else round(replication, 1)}s "
        f"failover={result.failover_seconds:.2f}s "
        f"commit={steps.get('commit', {}).get('duration_ms')}ms "
        f"committed={commit.get('committed')}+{commit.get('already_present')}"
        f"/{commit.get('expected')} failed={commit.get('failed')} "
        f"guard_lifted_after_hook={guard_up if guard_up is None else round(guard_up, 3)}s "
        f"tcp={summary.tcp_alive}/{summary.tcp_total} "
        f"udp={summary.udp_alive_same_endpoint}/{summary.udp_total} "
        f"gaps tcp={summary.tcp_longest_gap_ms:.0f}ms udp={summary.udp_longest_gap_ms:.0f}ms "
        f"kernel={result.new_primary_kernel_entries} steps: "
        + " ".join(f"{name}={step['duration_ms']:.0f}ms" for name, step in steps.items())
    )
