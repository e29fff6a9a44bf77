"""Warm standby: a failover costs VRRP detection alone at any table size, and flows
that have lived longer than every conntrack timeout of the backup survive it.

The router namespaces run with a UDP stream timeout of 8 s and an established
TCP timeout of 10 s, and the flows run 12 s before the failure: an entry the
primary reported once and never again would have run out on the backup. With the
refreshes each live flow's entry is sent again every refresh_interval (4 s), well
inside both timeouts. After the failure the flows run 8 s: TCP's retries after a
crash's 3-3.5 s of silence come 3.0 and 6.2 s after the first loss. About 30 s a
scenario.
"""

import pytest

from snat_sync.lab import demo

from functional.test_failover import (WARM_TAKEOVER, assert_alive_before_failure,
                                      warm_takeover_steps)

SHORT_TIMEOUTS = (("net.netfilter.nf_conntrack_udp_timeout_stream", 8),
                  ("net.netfilter.nf_conntrack_tcp_timeout_established", 10))
FLOWS_AGE_AT_FAILURE = 12.0  # older than both timeouts
RUN_AFTER_FAILURE = 8.0
IDLE_ENTRIES = 200_000
# The flows send every 50-100 ms: a flow's longest gap is the silence of the
# failover plus up to one sending interval and its reply.
SENDING_SLACK = 0.15


def run(tmp_path, name, failure, idle_entries=0, config=""):
    config_file = tmp_path / f"{name}.conf"
    config_file.write_text(config)
    settings = demo.ScenarioSettings(
        crash_after=FLOWS_AGE_AT_FAILURE, run_after_crash=RUN_AFTER_FAILURE, idle_entries=idle_entries,
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
