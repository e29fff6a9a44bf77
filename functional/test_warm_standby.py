"""Warm standby: a failover costs VRRP detection alone at any table size, and flows
that have lived longer than every conntrack timeout of the backup survive it.

The router namespaces run with a UDP stream timeout of 8 s and an established
TCP timeout of 10 s, and the flows run 12 s before the failure: an entry the
primary reported once and never again would have run out on the backup. With the
refreshes each live flow's entry is sent again every refresh_interval (4 s), well
inside both timeouts. About 25-30 s a scenario.
"""

import re
import time

import pytest

from snat_sync.lab import demo
from snat_sync.lab import nodes
from snat_sync.lab import topology as lab_module

from functional.test_failover import (WARM_TAKEOVER, assert_alive_before_failure,
                                      warm_takeover_steps)

SHORT_TIMEOUTS = (("net.netfilter.nf_conntrack_udp_timeout_stream", 8),
                  ("net.netfilter.nf_conntrack_tcp_timeout_established", 10))
FLOWS_AGE_AT_FAILURE = 12.0  # older than both timeouts
# After the failure the flows run on: 8 s after a crash (TCP's retries after its
# 3-3.5 s of silence come 3.0 and 6.2 s after the first loss), 4 s after a planned
# switchover (about 1 s of silence; a flow silent for 3 s would count as lost).
RUN_AFTER = {"crash": 8.0, "switchover": 4.0}
IDLE_ENTRIES = 200_000
# The flows send every 50-100 ms: a flow's longest gap is the silence of the
# failover plus up to one sending interval and its reply.
SENDING_SLACK = 0.15


def run(tmp_path, name, failure, idle_entries=0, config=""):
    config_file = tmp_path / f"{name}.conf"
    config_file.write_text(config)
    settings = demo.ScenarioSettings(
        crash_after=FLOWS_AGE_AT_FAILURE, run_after_crash=RUN_AFTER[failure],
        idle_entries=idle_entries,
        router_sysctls=SHORT_TIMEOUTS, failure=failure,
        snat_sync_arguments=("--config-file", str(config_file)))
    return demo.run_scenario(tmp_path / name, with_snat_sync=True, settings=settings)


def lost(result):
    return [flow for flow in result.flows
            if not (flow.alive and flow.same_public_endpoint)]


def longest_gaps(result):
    """(longest TCP gap, longest UDP gap) in seconds."""
    return tuple(max(flow.longest_gap_ms for flow in result.flows
                     if flow.protocol == protocol) / 1000
                 for protocol in ("tcp", "udp"))


def describe(result):
    tcp, udp = longest_gaps(result)
    return (f"{result.idle_entries_loaded} idle entries: VIP moved in "
            f"{result.failover_seconds:.2f} s, longest gap TCP {tcp:.2f} s, UDP "
            f"{udp:.2f} s, lost {[flow.flow_id for flow in lost(result)]}")


def assert_loads_nothing(result):
    transition = result.last_transition
    assert transition["outcome"] == "done", transition
    assert warm_takeover_steps(transition) == WARM_TAKEOVER, transition
    assert result.new_primary_kernel_entries >= result.idle_entries_loaded


@pytest.mark.alone
def test_planned_switchover_at_200k_entries_costs_what_an_empty_table_does(tmp_path):
    empty = run(tmp_path, "e", "switchover")
    full = run(tmp_path, "f", "switchover", IDLE_ENTRIES)
    report = f"{describe(empty)}; {describe(full)}"
    assert not lost(empty) and not lost(full), report
    assert full.idle_entries_loaded == IDLE_ENTRIES, report
    assert_loads_nothing(full)
    (empty_tcp, empty_udp), (full_tcp, full_udp) = longest_gaps(empty), longest_gaps(full)
    assert full_udp <= empty_udp + 0.1, report
    assert full_tcp <= empty_tcp + SENDING_SLACK, report
    print(report)


@pytest.mark.alone
def test_crash_at_200k_entries_costs_vrrp_detection_alone(tmp_path):
    result = run(tmp_path, "c", "crash", IDLE_ENTRIES)
    report = describe(result)
    assert not lost(result), report
    assert_loads_nothing(result)
    _tcp, udp = longest_gaps(result)
    assert udp <= result.failover_seconds + 0.1 + SENDING_SLACK, report
    print(report)


@pytest.mark.parametrize("config", ["[failover]\nrefresh_interval = 0\n"])
def test_without_refreshes_old_flows_lose_their_backup_entries(tmp_path, config):
    """The negative control: the same crash, with refreshes off."""
    result = run(tmp_path, "n", "crash", config=config)
    report = describe(result)
    assert_alive_before_failure(result)
    assert lost(result), report
    print(report)


# -- a flow that sends every other tick ---------------------------------------------
# Regression: the refresh used to flip one bit of the mark every tick, so a packet an
# even number of ticks after the flow's last one changed nothing and was never
# reported: a keepalive every 2 ticks kept its entry on the primary while the
# backup's copy ran out. Here: 1-s ticks, a datagram (and its echo) every 2 s in the
# middle of an even tick, UDP timeouts of 4 s; the datagram at 2 or 4 s makes the
# entry assured (a reported change), the later ones change nothing but the mark.
SPARSE_TICK = 1
SPARSE_PERIOD = 2
SPARSE_PACKETS = 7
SPARSE_TIMEOUTS = ("net.netfilter.nf_conntrack_udp_timeout=4",
                   "net.netfilter.nf_conntrack_udp_timeout_stream=4")
SPARSE_CLIENT_ADDRESS = "192.168.100.11"
# The flow with the counter, then the one with the one-bit rule (the control).
SPARSE_CLIENT_PORTS = {"counter": 40404, "one-bit": 40405}
SPARSE_SERVER_PORT = 9404
ECHO_SERVER = f"""
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", {SPARSE_SERVER_PORT}))
while True:
    data, peer = sock.recvfrom(64)
    sock.sendto(data, peer)
"""
# Sends at seconds of the day 0.5 (mod 2): mid-way into an even 1-s tick.
SPARSE_CLIENT_SCRIPT = f"""
import socket, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{SPARSE_CLIENT_ADDRESS}", {{port}}))
sock.settimeout(1.0)
now = time.time()
start = now - now % {SPARSE_PERIOD} + {SPARSE_PERIOD} + 0.5
for number in range({SPARSE_PACKETS}):
    time.sleep(max(0.0, start + number * {SPARSE_PERIOD} - time.time()))
    sock.sendto(b"ping", ("{{server}}", {SPARSE_SERVER_PORT}))
    try:
        sock.recvfrom(64)
        print(number, "echoed", flush=True)
    except socket.timeout:
        print(number, "lost", flush=True)
"""
# The refresh as it was: one bit flipped every tick (bit 8, as the counter's first).
ONE_BIT_REFRESH = """table inet snat_sync_refresh {
	chain prerouting {
		type filter hook prerouting priority filter; policy accept;
		meta hour & "00:00:01" == "00:00:00" ct mark set ct mark & 0xfffffeff
		meta hour & "00:00:01" != "00:00:00" ct mark set ct mark | 0x00000100
	}
}
"""


def sparse_entry(router, port):
    """The sparse flow's entry in router's table: its reply tuple's port, or None."""
    result = lab_module.run(
        ["conntrack", "-L", "-p", "udp", "-s", SPARSE_CLIENT_ADDRESS, "--sport",
         str(port), "--dport", str(SPARSE_SERVER_PORT)],
        namespace=router.namespace, check=False)
    ports = re.findall(r"dport=(\d+)", result.stdout)
    return ports[1] if len(ports) > 1 else None


def sample_sparse_flow(lab, tmp_path, port):
    """Run one sparse flow from port; (samples of (seconds, r1's entry, r2's
    entry), the client's log)."""
    r1, r2 = lab.routers
    log = tmp_path / f"sparse-{port}.log"
    client = lab_module.start_process(
        lab, lab.client_namespace,
        ["python3", "-c", SPARSE_CLIENT_SCRIPT.replace(
            "{server}", lab_module.SERVER_ADDRESS).replace("{port}", str(port))],
        log)
    samples = []
    began = time.monotonic()
    while client.poll() is None and time.monotonic() - began < 40:
        samples.append((round(time.monotonic() - began, 1), sparse_entry(r1, port),
                        sparse_entry(r2, port)))
        time.sleep(0.25)
    return samples, log.read_text()


def run_sparse_flows(tmp_path):
    """{"counter" / "one-bit": (samples, client log)}: one flow with the rendered
    refresh, then one with the one-bit rule loaded on r1 in its place."""
    with lab_module.running_lab(tmp_path / "lab") as lab:
        configs = {router.name: nodes.write_config(
            tmp_path / f"{router.name}.conf",
            extra=f"[failover]\nrefresh_interval = {SPARSE_TICK}\n")
            for router in lab.routers}
        for router in lab.routers:
            lab_module.sysctl(router.namespace, *SPARSE_TIMEOUTS)
        nodes.start_nodes(lab, tmp_path, configs)
        r1 = lab.routers[0]
        lab_module.start_process(lab, lab.server_namespace,
                                 ["python3", "-c", ECHO_SERVER], tmp_path / "echo.log")
        observed = {"counter": sample_sparse_flow(lab, tmp_path,
                                                  SPARSE_CLIENT_PORTS["counter"])}
        rules = tmp_path / "one-bit.nft"
        rules.write_text("delete table inet snat_sync_refresh\n" + ONE_BIT_REFRESH)
        lab_module.run(["nft", "-f", str(rules)], namespace=r1.namespace)
        observed["one-bit"] = sample_sparse_flow(lab, tmp_path,
                                                 SPARSE_CLIENT_PORTS["one-bit"])
    return observed


def missing_on_the_backup(samples):
    """Samples where the primary held the flow's entry and the backup did not
    (its first second aside: the replication's own lag)."""
    first = next((at for at, primary, _ in samples if primary), None)
    return [(at, primary, backup) for at, primary, backup in samples
            if primary and first is not None and at > first + 1.0
            and backup != primary]


def test_a_flow_that_sends_every_other_tick_keeps_its_backup_entry(tmp_path):
    """And its negative control, the same flow under the one-bit rule, loses it."""
    observed = run_sparse_flows(tmp_path)
    print(observed)
    for samples, log in observed.values():
        assert log.count("echoed") == SPARSE_PACKETS, log
        assert any(primary for _, primary, _ in samples), samples
    counter, _ = observed["counter"]
    assert not missing_on_the_backup(counter), missing_on_the_backup(counter)
    one_bit, _ = observed["one-bit"]
    assert missing_on_the_backup(one_bit), (
        f"the one-bit refresh kept the backup's entry: {one_bit}")
