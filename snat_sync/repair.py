"""Self-healing decisions: what a health check of one router found, what to repair.

The node daemon checks every router each [health] check_interval: it reads the
figures of the router's conntrackd (an Observation), sends them to the peers'
daemons, and hands `assess` the observation, the latest report of each peer and
what earlier checks remembered (Memory). `assess` decides, without touching
anything; the daemon carries out the repairs under the router's transition lock.

Faults and their repairs:

replica-short  This node is backup, and its replica (warm standby: its kernel
               table; cold: its external cache) holds fewer entries than the
               primary reports of the same kind (warm: its kernel table; cold:
               its internal cache; the other when that one is missing), by more
               than the tolerance, for repair_after checks in a row while neither
               count is moving. FTFW re-sends what it knows was lost, but never
               what the backup lost on its own side (a flushed or restarted
               cache): ask the primary for its whole table (conntrackd -n, or
               with warm standby from the primary's daemon, table_transfer.py).
               The primary's figures are from up to a check ago: the replica
               they are compared with is the larger of the replica now and at
               this node's last check before the primary counted, so a table
               shrinking on both nodes (a churn gap passing) does not read
               short; a flushed replica reads short from the primary's next
               report on. The verdict (health.py) keeps the replica read now.
split-brain    This node is primary and a peer reports primary too, in a report
               that reached this node after it became primary (the last report of
               a primary that died is not a split brain). Nothing is repaired
               while both forward.
peer-yielded   This node is primary and a peer reports a new transition into
               another role: it yielded after a split brain (the HA link may
               have been cut, so the split itself may never have been seen), or
               it came back. As primary the peer flushed its caches, and its
               own resync request may be off or lost: the survivor, this node,
               resyncs its cache from the kernel and sends the whole table, so
               the peer's replica is complete again. First it announces its
               addresses (gratuitous ARPs, IPv6 neighbour advertisements): a
               peer that yielded without being heard left the switches
               forwarding to it (announce.py).
Reported only: a peer whose daemon is silent, sync messages lost (for a node
with one peer: see _single_sender) or malformed since the last check (FTFW asks
again for lost ones), conntrackd not running
(the daemon restarts it as soon as it exits).
"""

import dataclasses

from snat_sync import failover
from snat_sync.roles import Role
from snat_sync.health import (BROKEN, DEGRADED, SHORT_TOLERANCE_MINIMUM, Problem,
                              replica_count, short_tolerance, table_count)

__all__ = ["SHORT_TOLERANCE_MINIMUM", "short_tolerance", "assess"]

REQUEST_RESYNC = "request-resync"
SURVIVOR_RESYNC = "survivor-resync"
REPAIR_STEPS = {
    REQUEST_RESYNC: (failover.REQUEST_RESYNC,),
    SURVIVOR_RESYNC: (failover.ANNOUNCE_ADDRESSES, failover.RESYNC_FROM_KERNEL,
                      failover.BULK_SEND),
}


@dataclasses.dataclass(frozen=True)
class Observation:
    """One router's figures at one health check (None where conntrackd said none)."""

    at: float
    role: str  # the role of the last transition, or "unknown"
    conntrackd_alive: bool
    internal: int | None
    external: int | None
    kernel: int | None
    messages_lost: int | None
    messages_malformed: int | None
    standby: str = "cold"  # [failover] standby_mode: where the replica lives
    changed: float | None = None  # when this node's last transition arrived

    @property
    def replica(self):
        return replica_count(self.standby, self.kernel, self.external)

    @property
    def table(self):
        return table_count(self.kernel, self.internal)


@dataclasses.dataclass(frozen=True)
class Settings:
    repair: bool
    repair_after: int
    repair_backoff: float
    short_tolerance_percent: float
    peer_timeout: float

    @classmethod
    def from_conf(cls, conf):
        health = conf.health
        return cls(health.repair, health.repair_after, health.repair_backoff,
                   health.short_tolerance_percent, health.peer_timeout)


@dataclasses.dataclass(frozen=True)
class Repair:
    name: str
    reason: str

    @property
    def steps(self):
        return REPAIR_STEPS[self.name]


@dataclasses.dataclass(frozen=True)
class Memory:
    """What one router's health checks carry from one check to the next."""

    previous: Observation | None = None
    since: tuple = ()  # (problem kind, first seen) of the problems seen last time
    short_streak: int = 0
    primary_count: int | None = None  # the primary's count at the last check
    peer_changes: tuple = ()  # (peer address, its report's "changed")
    last_repairs: tuple = ()  # (repair name, time)
    replicas: tuple = ()  # (time, replica) of this node's recent checks


@dataclasses.dataclass(frozen=True)
class Assessment:
    problems: tuple
    repairs: tuple
    memory: Memory


def assess(observation, reports, peer_addresses, memory, settings):
    """The problems and repairs of one health check, and what to remember.

    reports: {peer address: PeerReport}, the latest report of each peer.
    """
    now = observation.at
    previous = memory.previous
    fresh = {address: report for address, report in reports.items()
             if now - report.received <= settings.peer_timeout}
    found = []  # (kind, severity, message)
    repairs = []

    for peer in map(str, peer_addresses):
        if peer in fresh:
            continue
        heard = reports.get(peer)
        found.append(("peer-silent", DEGRADED,
                      f"no report from peer {peer}'s daemon "
                      + (f"for {now - heard.received:.0f} s" if heard else "yet")))
    if not observation.conntrackd_alive:
        found.append(("conntrackd-down", BROKEN, "conntrackd is not running"))
    for kind, figure in (("messages-lost", "messages_lost"),
                         ("messages-malformed", "messages_malformed")):
        if kind == "messages-lost" and not _single_sender(peer_addresses):
            continue
        grown = _growth(previous, observation, figure)
        if grown:
            found.append((kind, DEGRADED,
                          f"{grown} sync messages {kind.split('-')[1]} since the "
                          "last check" + (" (FTFW asks for them again)"
                                          if kind == "messages-lost" else "")))

    primaries = {address: report for address, report in fresh.items()
                 if report.role == Role.PRIMARY.value}
    known_changes = dict(memory.peer_changes)
    if observation.role == Role.PRIMARY.value:
        rivals = _primaries_since(primaries, observation.changed)
        if rivals:
            found.append(("split-brain", BROKEN,
                          f"split brain: peer {', '.join(sorted(rivals))} is "
                          "primary too"))
        yielded = sorted(
            address for address, report in fresh.items()
            if report.role != Role.PRIMARY.value and address in known_changes
            and report.changed != known_changes[address])
        if yielded:
            repairs.append(Repair(
                SURVIVOR_RESYNC,
                f"peer {', '.join(yielded)} left the primary role or came back "
                "while this node is primary: announce this node's addresses, resync "
                "from the kernel and send the whole table"))
    peer_changes = {**known_changes,
                    **{address: report.changed for address, report in fresh.items()}}

    short_streak, primary_count = 0, None
    counted = {address: _primary_count(report, observation.standby)
               for address, report in primaries.items()}
    counted = {address: count for address, count in counted.items()
               if count is not None}
    held = observation.replica
    replicas = _recent_replicas(memory.replicas, observation, settings)
    if observation.role == Role.BACKUP.value and held is not None and counted:
        address, primary_count = max(counted.items(), key=lambda item: item[1])
        tolerance = short_tolerance(primary_count, settings.short_tolerance_percent)
        counted_at = primaries[address].received - primaries[address].figures_age
        compared = max(held, _replica_before(replicas, counted_at) or 0)
        if primary_count - compared > tolerance:
            found.append(("replica-short", DEGRADED,
                          f"replica holds {held} of the primary "
                          f"{address}'s {primary_count} entries"))
            short_streak = memory.short_streak + 1
            before = previous.replica if previous is not None else None
            settled = (memory.primary_count is not None
                       and abs(primary_count - memory.primary_count) <= tolerance
                       and before is not None and held - before <= tolerance)
            if short_streak >= settings.repair_after and settled:
                repairs.append(Repair(
                    REQUEST_RESYNC,
                    f"replica short by {primary_count - held} "
                    f"entries for {short_streak} checks: ask the primary for its "
                    "whole table"))

    last_repairs = dict(memory.last_repairs)
    due = []
    for repair in repairs:
        if not settings.repair:
            continue
        if now - last_repairs.get(repair.name, float("-inf")) < settings.repair_backoff:
            continue
        last_repairs[repair.name] = now
        due.append(repair)
        if repair.name == REQUEST_RESYNC:
            short_streak = 0

    first_seen = dict(memory.since)
    problems = tuple(Problem(kind, severity, first_seen.get(kind, now), message)
                     for kind, severity, message in found)
    return Assessment(
        problems,
        tuple(due),
        Memory(
            previous=observation,
            since=tuple((problem.kind, problem.since) for problem in problems),
            short_streak=short_streak,
            primary_count=primary_count,
            peer_changes=tuple(sorted(peer_changes.items())),
            last_repairs=tuple(sorted(last_repairs.items())),
            replicas=replicas,
        ),
    )


def _recent_replicas(replicas, observation, settings):
    """This node's replica at its checks within a peer_timeout and a half: a
    fresh primary report's figures are no older than that."""
    recent = tuple((at, count) for at, count in replicas
                   if observation.at - at <= 1.5 * settings.peer_timeout)
    if observation.replica is None:
        return recent
    return recent + ((observation.at, observation.replica),)


def _replica_before(replicas, moment):
    """This node's replica at its last check at or before moment; None if no
    check is that old."""
    before = [(at, count) for at, count in replicas if at <= moment]
    return max(before)[1] if before else None


def _single_sender(peer_addresses):
    """Whether this node hears one peer only: conntrackd counts lost messages by
    gaps in one sequence of numbers for all it receives, so with two peers every
    switch from one sender to the other looks like a gap (thousands of "lost"
    messages at every check, none of them lost)."""
    return len(peer_addresses) <= 1


def _primaries_since(primaries, changed):
    """The peers that said they were primary after this node became primary.

    A primary that dies leaves its last report behind for up to peer_timeout; the
    node that took over would otherwise call that a split brain. Both times are
    this node's clock (when the report arrived, when the transition arrived).
    """
    if changed is None:
        return primaries
    return {address: report for address, report in primaries.items()
            if report.received > changed}


def _primary_count(report, standby):
    """The primary's figure a replica is compared with: the same kind of table.
    A warm replica is a kernel table; the primary's internal cache runs ahead of
    its kernel table under churn (about 2,000 entries at 2,000 new flows a
    second: conntrackd drops an entry only when its end is reported), which read
    as a short replica and a needless full resync every backoff. A cold replica
    is conntrackd's external cache, the copy of the primary's internal one."""
    if standby == "warm":
        return table_count(report.kernel, report.internal)
    return report.internal if report.internal is not None else report.kernel


def _growth(previous, current, figure):
    if previous is None:
        return 0
    before, after = getattr(previous, figure), getattr(current, figure)
    if before is None or after is None or after < before:  # conntrackd restarted
        return 0
    return after - before
