"""Benchmark: a rolling restart of a three-node router at a large table.

Each variant is snat_sync.lab.rolling.rolling_restart in a fresh lab: r1, r2 and
r3 (each with its own `snat-sync daemon`, keepalived advert_int 1, health checks
every second) with --idle idle SNAT entries (default 200,000) loaded into r1 and
16 TCP + 16 UDP long-lived flows; r1, r2, r3 die in turn while primary and return
(their old table kept, or flushed: a reboot), `snat-sync wait` runs on all three
nodes after each return, and the last return is followed by a final crash of the
primary:

    r1 dies -> r2 primary, r1 back;  r2 dies -> r3 primary, r2 back;
    r3 dies -> r1 primary, r3 back;  r1 crashes -> r2 primary

Reported per failover: the seconds until the next node held the VIPs, how long
an entry new on the new primary took to reach each other live node (before the
dead node returned), the seconds until `snat-sync wait` returned on all three
nodes after the return (and their exit statuses), the probe after the return,
whether every node's samples were the primary's, the fewest idle entries a node
held then (of --idle), and the TCP and UDP flows alive on their public port after
the failover.

    python3 bench/rolling_restart.py [--idle 200000] [--variants old-table,reboot]
        [--output results.json]

Needs root, conntrackd, keepalived, iptables and nft, as the functional tests do.
The lab's namespaces, processes and files are removed at the end of each variant.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

from snat_sync.lab import rolling

VARIANTS = {"old-table": False, "reboot": True}  # name: the node returns flushed


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=200_000,
                        help="idle SNAT entries on r1 (default 200000)")
    parser.add_argument("--variants", default="old-table,reboot",
                        help="comma-separated: old-table, reboot")
    parser.add_argument("--wait-timeout", type=float,
                        help="`snat-sync wait --timeout` after each return "
                        "(default 20 s + 1 s per 2,000 entries)")
    parser.add_argument("--output", help="also write the figures as JSON here")
    arguments = parser.parse_args(argv)
    unknown = set(arguments.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    return arguments


def figures(name, observed):
    return {
        "variant": name,
        "seconds": observed.seconds,
        "alive_after_each_failover": observed.alive_counts(),
        "failovers": [
            {**dataclasses.asdict(failover), "tables_agree": failover.tables_agree,
             "lost": observed.lost_after(index)}
            for index, failover in enumerate(observed.failovers)],
    }


def table(results):
    lines = ["variant    failover  takeover  probe (s)        wait     statuses   "
             "probe (s)        tables  fewest idle  TCP    UDP"]
    for result in results:
        for failover, (tcp, udp) in zip(result["failovers"],
                                        result["alive_after_each_failover"]):
            if failover["wait_status"]:
                statuses = str(tuple(failover["wait_status"]))
                after_return = (
                    f"{failover['wait_seconds']:>6.2f} s {statuses:<10} "
                    f"{_probe(failover['probe_after_return']):<16} "
                    f"{'same' if failover['tables_agree'] else 'DIFFER':<7} "
                    f"{min(failover['idle_held'].values()):>11}")
            else:  # the last failover: its victim does not return
                after_return = f"{'-':>8} {'-':<10} {'-':<16} {'-':<7} {'-':>11}"
            lines.append(
                f"{result['variant']:<10} {failover['victim']}->{failover['successor']}"
                f"    {failover['took_over_after']:>5.2f} s  "
                f"{_probe(failover['probe_after_failover']):<16} {after_return}"
                f" {tcp}/16  {udp}/16")
        lines.append(f"{result['variant']:<10} whole run {result['seconds']} s")
    return "\n".join(lines)


def _probe(reached):
    return " ".join(f"{name} {'-' if seconds is None else seconds}"
                    for name, seconds in sorted(reached.items()))


def main(argv=None):
    arguments = parse_arguments(argv)
    wait_timeout = arguments.wait_timeout or 20 + arguments.idle / 2_000
    results = []
    for name in arguments.variants.split(","):
        with tempfile.TemporaryDirectory(prefix="ss-roll-") as workdir:
            observed = rolling.rolling_restart(
                pathlib.Path(workdir), repair=True, flush=VARIANTS[name],
                idle_entries=arguments.idle, wait_timeout=wait_timeout)
        print(rolling.describe(observed), flush=True)
        results.append(figures(name, observed))
    print(f"\n{arguments.idle} idle entries, three nodes\n" + table(results))
    if arguments.output:
        pathlib.Path(arguments.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
