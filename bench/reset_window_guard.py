"""Benchmark: what the reset-window guard does for UDP flows at a cold-standby failover.

The effect is probabilistic (a UDP flow is remapped only when one of its packets
reaches the new primary between keepalived raising the VIPs and the commit), so it
is measured over several runs here rather than asserted by a functional test. Each
run is the demo's crash scenario (16 TCP + 16 UDP flows, 8 client addresses
sharing source ports, r1 crashed 3 s in) with snat-sync in `[failover]
standby_mode = cold`, once with `reset_window_guard = true` (the default) and once
with `false`. Printed per run: UDP flows alive with the same public port, TCP flows
alive, the failover time; then the runs in which a flow came back remapped.

    python3 bench/reset_window_guard.py [--runs 5]      (root)
"""

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (the package from this tree, for every child)

from snat_sync.lab import demo  # noqa: E402

CONFIG = "[failover]\nstandby_mode = cold\nreset_window_guard = {guard}\n" \
         "[metrics]\nlisten_port = 0\n"


def one_run(workdir, guard):
    config = workdir / f"guard-{guard}.conf"
    config.write_text(CONFIG.format(guard=str(guard).lower()))
    config.chmod(0o600)
    settings = demo.ScenarioSettings(snat_sync_arguments=("--config-file", str(config)))
    return demo.run_scenario(workdir / f"run-{guard}", with_snat_sync=True,
                             settings=settings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    problems = demo.missing_prerequisites()
    if problems:
        sys.exit("; ".join(problems))
    remapped = {True: 0, False: 0}
    with tempfile.TemporaryDirectory(prefix="snat-sync-bench-guard-") as directory:
        for run in range(1, arguments.runs + 1):
            for guard in (True, False):
                workdir = pathlib.Path(directory) / f"{run}"
                workdir.mkdir(exist_ok=True)
                result = one_run(workdir, guard)
                summary = result.summary
                kept = summary.udp_alive_same_endpoint
                remapped[guard] += kept < summary.udp_total
                print(f"run {run} guard {'on ' if guard else 'off'}: UDP same port "
                      f"{kept}/{summary.udp_total}, TCP alive "
                      f"{summary.tcp_alive}/{summary.tcp_total}, failover "
                      f"{result.failover_seconds:.2f} s", flush=True)
    for guard in (True, False):
        print(f"guard {'on ' if guard else 'off'}: UDP flows remapped in "
              f"{remapped[guard]} of {arguments.runs} runs")


if __name__ == "__main__":
    main()
