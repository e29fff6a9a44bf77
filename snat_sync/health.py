"""The verdict on one router's replication: in-sync, degraded or broken, and why.

`snat-sync status` gathers the facts (manager.status); the node daemon's latest
health check of the router, health.json, adds what this node cannot see alone:
the peers' figures and the problems the daemon found (repair.py). Everything here
is pure:

    parse_report  health.json, read as untrusted input, into a HealthReport
    judge         the facts and the report into a Verdict

The rules, first match wins:
    broken    the router's spec is unreadable or its namespace is gone; conntrackd
              is not running; a cache ran full; the last transition failed; the
              daemon's fresh check found a broken problem (split brain, ...)
    degraded  no fresh health check (is `snat-sync daemon` running?); a degraded
              problem in it; the node's role is unknown; the figures that would
              show the replica complete are missing or stale (below); the replica
              is short: "resyncing, 120000 of 200000"
    in-sync   otherwise, with the figures that show it

The replica and the table it copies (`replica`):
    backup    its replica (warm standby: its own kernel table; cold: conntrackd's
              external cache), read now, against the primary's table (the kernel
              count in its latest report, else its internal cache), which must
              have been taken within REPORT_FRESH_CHECKS check intervals
    primary   its own table, against each peer's reported replica (fresh reports
              only): the smaller of its table read now and its table when the
              daemon wrote the report, which the peers' figures in it go with.
              A table that grew since (a churn of new flows: 2,000 a second
              after a failover) holds entries the peers' older figures cannot
              show yet, not entries they lack; the verdict read it "resyncing"
              at every check until the table was at rest again
Short means by more than short_tolerance (1 % and 16 entries), as the repair
counts it. The daemon's own "replica-short" problem is left to this rule: it
was judged on the figures of the daemon's last check, these are newer.
"""

import dataclasses
import math
import re

from snat_sync.roles import Role

IN_SYNC = "in-sync"
DEGRADED = "degraded"
BROKEN = "broken"
SEVERITIES = (DEGRADED, BROKEN)
# The roles a node (or a peer's report) may have; anything else reads "unknown".
PEER_ROLES = tuple(role.value for role in Role)
# health.json is fresh while the daemon has missed fewer than three checks.
FRESH_CHECKS = 3
# A peer's figures count while taken within this many check intervals: one for the
# report to arrive, one for the next check to pick it up, a half for scheduling.
REPORT_FRESH_CHECKS = 2.5
# A replica this close to the primary's count is in step: entries come and go
# between the two reads.
SHORT_TOLERANCE_MINIMUM = 16
# The daemon's problem that the replica rule judges again on newer figures.
REPLICA_SHORT = "replica-short"
# Bounds for what health.json may hold: it is read as untrusted input.
MAX_COUNT = 2**48
MAX_TEXT = 300
MAX_PEERS = 64
MAX_PROBLEMS = 64
MAX_AGE = 86400.0
STANDBY_MODES = ("warm", "cold")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class ReportedPeer:
    """What the node daemon last heard from a peer's daemon."""

    address: str
    role: str
    seen: float | None  # when its latest report arrived, this node's clock
    internal: int | None
    external: int | None
    kernel: int | None
    figures_age: float = 0.0  # how old its figures were when the report left
    standby: str | None = None  # "warm", "cold"; None: not said (older peer)

    def replica(self, default_standby):
        """The peer's replica: its kernel table in warm standby, else its
        external cache."""
        return replica_count(self.standby or default_standby, self.kernel,
                             self.external)

    @property
    def table(self):
        """The peer's own table: its kernel count, else its internal cache."""
        return table_count(self.kernel, self.internal)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A fault the node daemon's check found (repair.assess), as health.json has it."""

    kind: str
    severity: str  # DEGRADED or BROKEN
    since: float | None
    message: str

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HealthReport:
    """The node daemon's latest health check of one router (health.json)."""

    checked: float
    interval: float
    role: str
    peers: tuple[ReportedPeer, ...]
    problems: tuple[Problem, ...]
    last_repair: dict | None
    # Seconds between the daemon's checks (older daemons: the rewrite interval).
    check_interval: float | None = None
    # The latest check that found the file still right (its mtime: the daemon
    # touches it instead of rewriting it when nothing but small moves changed).
    confirmed: float | None = None
    # This node's own table when the file was written (kernel count, else
    # internal cache): the moment the peers' figures in it go with.
    table: int | None = None

    def age(self, now):
        return now - self.checked

    def is_fresh(self, now):
        return self.age(now) <= FRESH_CHECKS * self.interval

    def peer(self, address):
        return next((peer for peer in self.peers if peer.address == address), None)

    @property
    def report_window(self):
        """How old a peer's figures may be and still count."""
        return REPORT_FRESH_CHECKS * (self.check_interval or self.interval)

    def figures_age(self, peer, now):
        """How old the peer's figures are now; None if it never reported.

        A peer whose report was within the window when the file was written is
        still within it at each check that only confirmed the file (a staler
        report makes the daemon rewrite it): its arrival moves on with that
        confirmation.
        """
        if peer.seen is None:
            return None
        seen = peer.seen
        confirmed = self.confirmed if self.confirmed is not None else self.checked
        if confirmed > self.checked and self.checked - seen <= self.report_window:
            seen += confirmed - self.checked
        return max(now - seen, 0.0) + peer.figures_age


@dataclasses.dataclass(frozen=True)
class Facts:
    """What status found about one router on this node."""

    spec_readable: bool
    namespace: str
    namespace_exists: bool
    conntrackd_alive: bool
    cache_full_drops: int | None
    last_transition: dict | None
    role: str  # "primary", "backup" or "unknown"
    internal_cache: int | None
    external_cache: int | None
    report: HealthReport | None
    kernel_entries: int | None = None  # this node's kernel table, read now
    standby_mode: str = "cold"  # [failover] standby_mode: where a replica lives
    short_tolerance_percent: float = 1.0
    # whose conntrackd configuration runs ("primary", "backup"; None: the same)
    conntrackd_configuration: str | None = None

    @property
    def replica(self):
        """This node's replica, as a backup holds it."""
        return replica_count(self.standby_mode, self.kernel_entries,
                             self.external_cache)

    @property
    def table(self):
        """This node's own table, as a primary holds it."""
        return table_count(self.kernel_entries, self.internal_cache)


@dataclasses.dataclass(frozen=True)
class Verdict:
    word: str  # IN_SYNC, DEGRADED or BROKEN
    reason: str


@dataclasses.dataclass(frozen=True)
class Replica:
    """How complete the replica is that a failover would start from.

    On a backup: its own replica against the primary's table; on a primary: the
    fullest fresh peer replica against its own table. missing: what a failover
    now would lose, max(primary - replica, 0). None where a figure is unknown
    or stale; problem says why (None when the replica is complete).
    """

    replica_entries: int | None
    primary_entries: int | None
    missing_entries: int | None
    problem: str | None


def replica_count(standby_mode, kernel, external):
    """Where a backup keeps its replica: warm standby in its kernel table,
    cold in conntrackd's external cache."""
    return kernel if standby_mode == "warm" else external


def table_count(kernel, internal):
    """A node's own table: its kernel count, else conntrackd's internal cache."""
    return kernel if kernel is not None else internal


def short_tolerance(primary_count, percent):
    return max(SHORT_TOLERANCE_MINIMUM, primary_count * percent / 100)


def is_short(replica, primary, percent):
    return primary - replica > short_tolerance(primary, percent)


def judge(facts, now):
    """The verdict on the router's replication (see the module's rules)."""
    report = facts.report
    fresh = report is not None and report.is_fresh(now)
    if not facts.spec_readable:
        return Verdict(BROKEN, "its spec.json is missing or unreadable")
    if not facts.namespace_exists:
        return Verdict(BROKEN, f"namespace {facts.namespace} does not exist")
    if not facts.conntrackd_alive:
        return Verdict(BROKEN, "conntrackd is not running")
    if facts.cache_full_drops:
        return Verdict(BROKEN, f"conntrackd's cache ran full and dropped "
                               f"{facts.cache_full_drops} entries; raise "
                               "[conntrackd] hash_limit")
    failure = transition_failure(facts.last_transition)
    if failure:
        return Verdict(BROKEN, failure)
    if facts.role == "primary" and facts.conntrackd_configuration == "backup":
        return Verdict(BROKEN, "primary, but conntrackd runs the backup's "
                               "configuration, which reads no conntrack events: "
                               "nothing forwarded here is replicated")
    problems = report.problems if fresh else ()
    broken = _messages(problems, BROKEN)
    if broken:
        return Verdict(BROKEN, broken)
    if not fresh:
        return Verdict(DEGRADED, _no_check(report, now))
    degraded = _messages([problem for problem in problems
                          if problem.kind != REPLICA_SHORT], DEGRADED)
    if degraded:
        return Verdict(DEGRADED, degraded)
    if facts.role not in ("primary", "backup"):
        return Verdict(DEGRADED, "role unknown: the primary address cannot be read "
                                 "and no transition is recorded")
    found = replica(facts, now)
    if found.problem:
        return Verdict(DEGRADED, found.problem)
    return Verdict(IN_SYNC, _in_sync_reason(facts, report, now))


def transition_failure(record):
    """What went wrong in a failed last transition; None if it did not fail."""
    if not isinstance(record, dict) or record.get("outcome") != "failed":
        return None
    role = _text(record.get("role")) or "last"
    errors = record.get("errors")
    first = _text(errors[0]) if isinstance(errors, list) and errors else None
    return f"the {role} transition failed" + (f": {first}" if first else "")


def _messages(problems, severity):
    return "; ".join(problem.message for problem in problems
                     if problem.severity == severity)


def _no_check(report, now):
    if report is None:
        return ("no health check from the node daemon yet — is `snat-sync daemon` "
                "running?")
    return (f"no health check from the node daemon in {max(report.age(now), 0):.0f} s"
            " — is `snat-sync daemon` running?")


def replica(facts, now):
    """The Replica of the router in its role (see the module's rules). Pure."""
    report = facts.report
    if facts.role == "backup":
        return _backup_replica(facts, report, now)
    if facts.role == "primary":
        return _primary_replica(facts, report, now)
    return Replica(None, None, None, "role unknown")


def _backup_replica(facts, report, now):
    own = facts.replica
    primaries = [peer for peer in (report.peers if report else ())
                 if peer.role == "primary"]
    if not primaries:
        return Replica(own, None, None, "no report from the primary's daemon: "
                       "its table is unknown")
    aged = [(report.figures_age(peer, now), peer) for peer in primaries]
    age, primary = min(aged, key=lambda item: (item[0] is None, item[0] or 0))
    if age is None or age > report.report_window:
        return Replica(own, primary.table, None, (
            f"the primary {primary.address}'s latest report is {age:.0f} s old "
            f"(older than {report.report_window:.0f} s): its table is unknown"
            if age is not None else
            f"the primary {primary.address} has not reported its table"))
    table = primary.table
    if table is None:
        return Replica(own, None, None, f"the primary {primary.address} has not "
                       "reported its table")
    if own is None:
        where = ("kernel table" if facts.standby_mode == "warm"
                 else "external cache (conntrackd did not answer)")
        return Replica(None, table, None, f"replica unknown: no figure for the "
                       f"{where}")
    missing = max(table - own, 0)
    if is_short(own, table, facts.short_tolerance_percent):
        return Replica(own, table, missing, (
            f"resyncing, {own} of {table} entries from the primary "
            f"{primary.address}: would lose {missing} entries if it failed over "
            "now"))
    return Replica(own, table, missing, None)


def primary_table(facts, report):
    """The primary's table the peers' figures are compared with (see the
    module's rules)."""
    if facts.table is None or report is None or report.table is None:
        return facts.table
    return min(facts.table, report.table)


def _primary_replica(facts, report, now):
    table = primary_table(facts, report)
    peers = [peer for peer in (report.peers if report else ())
             if peer.role != "primary"]
    if not peers:
        return Replica(None, table, None, "no report from any peer's daemon: "
                       "what the peers hold is unknown")
    if table is None:
        return Replica(None, None, None, "its own table is unknown")
    notes, replicas = [], []
    for peer in peers:
        age = report.figures_age(peer, now)
        held = peer.replica(facts.standby_mode)
        if age is None or age > report.report_window:
            notes.append(f"peer {peer.address}'s latest report is "
                         + (f"{age:.0f} s old" if age is not None else "missing"))
        elif held is None:
            notes.append(f"peer {peer.address} did not report its replica")
        else:
            replicas.append(held)
            if is_short(held, table, facts.short_tolerance_percent):
                notes.append(f"peer {peer.address} resyncing, {held} of {table}")
    best = max(replicas) if replicas else None
    missing = max(table - best, 0) if best is not None else None
    if notes:
        if missing is not None:
            notes.append(f"would lose {missing} entries if it failed over now")
        return Replica(best, table, missing, "; ".join(notes))
    return Replica(best, table, missing, None)


def _in_sync_reason(facts, report, now):
    if facts.role == "backup":
        found = _backup_replica(facts, report, now)
        return (f"replica holds {found.replica_entries} of the primary's "
                f"{found.primary_entries} entries")
    held = [f"peer {peer.address} holds {peer.replica(facts.standby_mode)} of "
            f"{_figure(primary_table(facts, report))} entries"
            for peer in report.peers if peer.role != "primary"]
    return "; ".join(held)


def _figure(value):
    return "?" if value is None else str(value)


# -- health.json ----------------------------------------------------------------------


def parse_report(data, confirmed=None):
    """The HealthReport in health.json's data; None if it holds none.

    confirmed: the file's mtime, the latest check that found it still right.

    The file is untrusted input: a report without a valid check time and interval
    is none; a peer, problem or field of the wrong type or size is left out.
    """
    if not isinstance(data, dict):
        return None
    checked = _number(data.get("checked"))
    interval = _number(data.get("interval"))
    if checked is None or interval is None or interval <= 0:
        return None
    check_interval = _number(data.get("check_interval"))
    if check_interval is not None and check_interval <= 0:
        check_interval = None
    peers = data.get("peers")
    problems = data.get("problems")
    repairs = data.get("repairs")
    return HealthReport(
        checked=checked,
        interval=interval,
        role=_role(data.get("role")),
        peers=tuple(filter(None, map(_peer, _list(peers)[:MAX_PEERS]))),
        problems=tuple(filter(None, map(_problem, _list(problems)[:MAX_PROBLEMS]))),
        last_repair=repairs[-1] if _list(repairs) and isinstance(repairs[-1], dict)
        else None,
        check_interval=check_interval,
        confirmed=confirmed if confirmed is not None and math.isfinite(confirmed)
        else None,
        table=_count(data.get("table")),
    )


def _peer(data):
    if not isinstance(data, dict):
        return None
    address = _text(data.get("address"), 64)
    if not address:
        return None
    return ReportedPeer(
        address=address,
        role=_role(data.get("role")),
        seen=_number(data.get("seen")),
        internal=_count(data.get("internal")),
        external=_count(data.get("external")),
        kernel=_count(data.get("kernel")),
        figures_age=min(max(_number(data.get("figures_age")) or 0.0, 0.0), MAX_AGE),
        standby=data.get("standby") if data.get("standby") in STANDBY_MODES
        else None,
    )


def _problem(data):
    if not isinstance(data, dict) or data.get("severity") not in SEVERITIES:
        return None
    message = _text(data.get("message"))
    if not message:
        return None
    return Problem(kind=_text(data.get("kind"), 32) or "unknown",
                   severity=data["severity"], since=_number(data.get("since")),
                   message=message)


def _list(value):
    return value if isinstance(value, list) else []


def _role(value):
    return value if value in PEER_ROLES else "unknown"


def _number(value):
    """A finite float from JSON (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _count(value):
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_COUNT else None


def _text(value, limit=MAX_TEXT):
    """A string safe to print on a terminal: control characters replaced, cut."""
    if not isinstance(value, str):
        return None
    return _UNPRINTABLE.sub("?", value)[:limit]
