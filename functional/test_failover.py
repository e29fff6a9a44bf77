"""A crash of the primary router, with and without snat-sync (about 20 s each)."""

from snat_sync.lab import demo
from snat_sync.lab import flows


def describe(flows):
    return "\n".join(
        f"{flow.flow_id} {flow.client_endpoint}: alive={flow.alive} "
        f"gap={flow.longest_gap_ms:.0f}ms public={','.join(flow.public_endpoints)} "
        f"error={flow.error}"
        for flow in flows
    )


def assert_alive_before_failure(result):
    """A negative control's first proof: every flow got replies, the last of them
    shortly before r1 failed. Without it, a lab in which no flow ever got a reply
    would "lose flows" too."""
    assert result.failure_at is not None and result.failure_at > 0, result.failure_at
    assert all(flow.replies_before(result.failure_at) for flow in result.flows), (
        "flows without a single reply before the failure:\n" + describe(result.flows))
    dead = result.dead_before_failure()
    assert not dead, (
        f"flows without a reply in the {flows.ALIVE_WINDOW:.0f} s before the "
        f"failure at {result.failure_at:.2f} s: " + ", ".join(
            f"{flow.flow_id} last reply {flow.last_reply_before(result.failure_at)}"
            for flow in dead))


def warm_takeover_steps(transition):
    """(name, started conntrackd, skipped) of a warm takeover's steps."""
    return [(step["name"], step.get("started_conntrackd"),
             step.get("skipped") is not None) for step in transition["steps"]]


# By default a backup's conntrackd reads no conntrack events: the takeover
# restarts it with the primary's configuration, whose start reads the kernel's
# table into conntrackd's cache, so the -R after it is skipped; nothing is loaded.
WARM_TAKEOVER = [("run-as-primary", True, False), ("resync-from-kernel", False, True)]

def test_snat_sync_keeps_flows(tmp_path):
    result = demo.run_scenario(tmp_path, with_snat_sync=True)

    broken = [flow for flow in result.flows if not flow.alive]
    assert not broken, f"flows lost despite snat-sync:\n{describe(broken)}"
    moved = [flow for flow in result.flows if not flow.same_public_endpoint]
    assert not moved, f"flows seen from another public address:port:\n{describe(moved)}"
    assert result.summary.tcp_alive == result.summary.tcp_total == 16
    assert result.summary.udp_alive_same_endpoint == result.summary.udp_total == 16
    transition = result.last_transition
    assert transition["role"] == "primary" and transition["outcome"] == "done", transition
    assert warm_takeover_steps(transition) == WARM_TAKEOVER, transition


def test_keepalived_alone_loses_flows(tmp_path):
    result = demo.run_scenario(tmp_path, with_snat_sync=False)

    summary = result.summary
    assert summary.tcp_total == summary.udp_total == 16
    assert_alive_before_failure(result)
    assert summary.tcp_alive < summary.tcp_total, describe(result.flows)
    assert summary.udp_alive_same_endpoint < summary.udp_total, describe(result.flows)
    assert result.new_primary_status is None


def test_cold_standby_keeps_flows(tmp_path):
    """With the replica kept in conntrackd's external cache and committed at
    failover behind the guard, every flow must survive all the same."""
    config = tmp_path / "cold.conf"
    config.write_text("[failover]\nstandby_mode = cold\n")
    settings = demo.ScenarioSettings(
        snat_sync_arguments=("--config-file", str(config)))
    result = demo.run_scenario(tmp_path / "run", with_snat_sync=True,
                               settings=settings)

    lost = [flow for flow in result.flows
            if not (flow.alive and flow.same_public_endpoint)]
    assert not lost, describe(lost)
    transition = result.last_transition
    assert [step["name"] for step in transition["steps"]] == [
        "commit", "lift-guard", "flush-caches", "resync-from-kernel", "bulk-send"], \
        transition
    assert transition["outcome"] == "done", transition
