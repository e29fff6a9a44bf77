"""A short fault soak (issue 14) with a fixed seed: bench/soak.py's run, smaller.

One router pair, `snat-sync daemon` on each node, 20,000 idle entries, 16 TCP +
16 UDP long-lived flows, 2,000 new flows a second, and a fixed representative
subset of the fault catalogue, each once (a crash and return after a reboot,
kill -9 of the primary's conntrackd, a partition of the primary's HA link, a
SIGHUP): after each, every flow must be alive on its public port, the primary
must hold every idle entry, both nodes must be in-sync within the soak's bound
and nothing may be left over (snat_sync.lab.soak's checks).

5 to 7 minutes on 2 loaded cores (the checks wait for in-sync, which the churn
delays), so opt-in for now: SNAT_SYNC_SOAK=1. It does not pass yet: in its two
runs a partition stalled every flow (fixed since: garp_lower_prio_repeat, see
lab.soak), and faults did not settle to in-sync within 90 s (the churn's lag, and
once a split-brain verdict on both nodes that outlived the 3.4 s partition).
"""

import os

import pytest

from snat_sync.lab import soak

KINDS = ("crash-flushed", "kill-conntrackd-primary", "partition", "sighup")
SETTINGS = soak.Settings(seed=14, minutes=2, idle_entries=20_000, kinds=KINDS,
                         spacing=(15.0, 25.0), copies=1, run_late_faults=True)

if os.environ.get("SNAT_SYNC_SOAK", "") in ("", "0"):
    pytest.skip("the soak takes 5 to 7 minutes: set SNAT_SYNC_SOAK=1",
                allow_module_level=True)


def test_a_short_soak_loses_nothing(tmp_path):
    lines = []
    outcomes, skipped = soak.run_soak(tmp_path, SETTINGS, progress=lines.append)
    report = "\n".join(lines)
    print(report)
    assert not skipped, report
    assert {outcome.fault.kind for outcome in outcomes} == set(KINDS), report
    assert any(outcome.failover for outcome in outcomes), report
    assert soak.summary(outcomes)[2:] == (0, 0), report
    assert soak.exit_status(outcomes) == 0, report
