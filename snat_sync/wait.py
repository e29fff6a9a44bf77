"""`snat-sync wait`: block until the named routers are in sync, for rolling upgrades.

    snat-sync wait --timeout 600 && <restart the next node>

Polls the same status and verdict as `snat-sync status` (manager.status,
health.judge) every --interval seconds. Each poll reads this node's own figures
afresh (the kernel count from /proc; the external cache from conntrackd's
control socket, under a short timeout) and the peers' from health.json, which
the node daemon rewrites at every check while the figures move. A backup's
replica catching up is read live, against a primary's table that is at rest by
then: wait returns within one --interval of the replica becoming complete, not a
health-check interval later.

Exit status: 0 as soon as every router is in sync; 1 when the timeout passes
first, printing each router that is not and why; 2 for a router unknown here.
The decision (`decide`) is pure; `run` is the loop, with the clock, the sleep
and the status source given, so tests need no router.
"""

import dataclasses
import time

from snat_sync import health

# conntrackd's answer may take this long before a poll counts it as unknown.
STATS_TIMEOUT = 0.3
DEFAULT_TIMEOUT = 300.0
DEFAULT_INTERVAL = 0.25
MAX_TIMEOUT = 86400.0


@dataclasses.dataclass(frozen=True)
class Decision:
    done: bool  # every router is in sync
    waiting: tuple  # (router, verdict, reason) of each router not in sync


def decide(statuses):
    """Whether every router in statuses (RouterStatus-shaped) is in sync."""
    waiting = tuple((each.router, each.verdict, each.reason) for each in statuses
                    if each.verdict != health.IN_SYNC)
    return Decision(not waiting, waiting)


def run(source, timeout, interval, clock=time.monotonic, sleep=time.sleep,
        report=print):
    """Poll source() (a list of RouterStatus) until decide says done or timeout
    seconds pass; the exit status (0 in sync, 1 timed out)."""
    deadline = clock() + timeout
    while True:
        decision = decide(source())
        if decision.done:
            return 0
        remaining = deadline - clock()
        if remaining <= 0:
            for router, verdict, reason in decision.waiting:
                report(f"{router}: {verdict}: {reason}")
            report(f"snat-sync wait: {len(decision.waiting)} router"
                   f"{'s' if len(decision.waiting) != 1 else ''} not in sync after "
                   f"{timeout:g} s")
            return 1
        sleep(min(interval, remaining))


def status_source(conf, routers, status):
    """A source of the named routers' status (all when routers is empty).

    status: manager.status. Each named router is checked once, up front: an
    unknown one raises InvalidInput (exit 2) before any waiting.
    """
    names = list(dict.fromkeys(routers))
    for name in names:
        status(conf, name, stats_timeout=STATS_TIMEOUT)

    def source():
        if not names:
            return status(conf, stats_timeout=STATS_TIMEOUT)
        return [found for name in names
                for found in status(conf, name, stats_timeout=STATS_TIMEOUT)]

    return source
