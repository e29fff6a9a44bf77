"""Fault soak (issue 14): a router under load and a seeded schedule of faults.

One lab router (snat_sync.lab.topology) on two nodes or, with --nodes 3, on
three (multicast sync), `snat-sync daemon` and keepalived on each node, idle SNAT
entries on the primary, 16 TCP + 16 UDP long-lived flows with colliding source
ports, and a churn of new UDP flows (default 2,000/s), the whole time. Every
20-40 s one fault of the catalogue in snat_sync/lab/soak.py is due (crash and
return with and without the old table, switchover, kill -9 of conntrackd on the
primary or a backup and of a daemon, partition and heal, 20% sync loss for 30 s,
notify storm, SIGHUP, `router add` again), then the checks: flows alive on their
public ports, the new primary's table complete, every node's status in-sync
within a bound, nothing left over. A fault starts when due or, when the checks
of the one before take longer, right after them; none starts after the soak's
minutes are over (those are listed as not run). One row per fault, then
`N faults, M failovers, K flows lost, L entries lost`; exit status 1 if anything
was lost or did not settle, 2 if the soak cannot run here.

    python3 bench/soak.py [--seed 1] [--minutes 10] [--idle 100000] [--churn 2000]
                          [--nodes 2|3] [--keep-workdir]

Root; everything it builds lives in namespaces `ssb-<hex>-...` and is removed
however the run ends (an interrupt, an error, or the hard time limit: minutes
plus HARD_LIMIT_EXTRA).
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from snat_sync.lab import demo  # noqa: E402
from snat_sync.lab import soak  # noqa: E402
from snat_sync.lab import topology as lab_module  # noqa: E402

# Setup (idle entries, replication) and the last fault's checks run past the
# schedule's minutes; the run is cut (and cleaned up) this long after them.
HARD_LIMIT_EXTRA = 600


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="bench/soak.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=100_000,
                        help="idle SNAT entries on the primary")
    parser.add_argument("--flows", type=int, default=16,
                        help="long-lived TCP flows and UDP flows each")
    parser.add_argument("--churn", type=float, default=2000.0,
                        help="new short flows a second")
    parser.add_argument("--nodes", type=int, default=2,
                        help="nodes of the router: 2, or 3 (multicast sync)")
    parser.add_argument("--kinds", default=",".join(soak.KINDS),
                        help="the fault kinds to draw from, comma-separated")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the logs and state paths (printed at the end)")
    return parser.parse_args(argv)


def hard_limit(signal_number, frame):
    raise KeyboardInterrupt("the soak's hard time limit")


def main(argv=None):
    arguments = parse_arguments(argv)
    try:
        soak.check_node_count(arguments.nodes)
    except ValueError as error:
        print(f"bench/soak.py: {error}", file=sys.stderr)
        return 2
    kinds = tuple(arguments.kinds.split(","))
    unknown = set(kinds) - set(soak.KINDS)
    if unknown:
        print(f"bench/soak.py: unknown fault kinds {sorted(unknown)}", file=sys.stderr)
        return 2
    problems = demo.missing_prerequisites()
    if problems:
        for problem in problems:
            print(f"bench/soak.py: {problem}", file=sys.stderr)
        return 2
    settings = soak.Settings(seed=arguments.seed, minutes=arguments.minutes,
                             idle_entries=arguments.idle, flows=arguments.flows,
                             churn_rate=arguments.churn, nodes=arguments.nodes,
                             kinds=kinds)
    print(common.uptime_line(), flush=True)
    workdir = tempfile.mkdtemp(prefix="snat-sync-soak-")
    signal.signal(signal.SIGALRM, hard_limit)
    signal.alarm(int(arguments.minutes * 60 + HARD_LIMIT_EXTRA))
    try:
        with demo.interrupts_raise():
            outcomes, skipped = soak.run_soak(
                workdir, settings, progress=lambda line: print(line, flush=True),
                prefix=f"ssb-{os.urandom(3).hex()}")
    except KeyboardInterrupt as interrupt:
        print(f"bench/soak.py: interrupted ({interrupt}); everything it built was "
              "removed", file=sys.stderr)
        return 130
    except lab_module.LabError as error:
        print(f"bench/soak.py: {error}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        if arguments.keep_workdir:
            print(f"logs and state paths: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(common.uptime_line())
    return soak.exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
