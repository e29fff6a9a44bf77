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
              problem in it; the node's role is unknown
    in-sync   otherwise, with the figures that show it
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
# Bounds for what health.json may hold: it is read as untrusted input.
MAX_COUNT = 2**48
MAX_TEXT = 300
MAX_PEERS = 64
MAX_PROBLEMS = 64
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class ReportedPeer:
    """What the node daemon last heard from a peer's daemon."""

    address: str
    role: str
    seen: float | None
    internal: int | None
    external: int | None
    kernel: int | None


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

    def age(self, now):
        return now - self.checked

    def is_fresh(self, now):
        return self.age(now) <= FRESH_CHECKS * self.interval

    def peer(self, address):
        return next((peer for peer in self.peers if peer.address == address), None)


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


@dataclasses.dataclass(frozen=True)
class Verdict:
    word: str  # IN_SYNC, DEGRADED or BROKEN
    reason: str


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
    problems = report.problems if fresh else ()
    broken = _messages(problems, BROKEN)
    if broken:
        return Verdict(BROKEN, broken)
    if not fresh:
        return Verdict(DEGRADED, _no_check(report, now))
    degraded = _messages(problems, DEGRADED)
    if degraded:
        return Verdict(DEGRADED, degraded)
    if facts.role not in ("primary", "backup"):
        return Verdict(DEGRADED, "role unknown: the primary address cannot be read "
                                 "and no transition is recorded")
    return Verdict(IN_SYNC, _in_sync_reason(facts, report))


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


def _in_sync_reason(facts, report):
    peers = report.peers if report else ()
    if facts.role == "backup":
        primary = next((peer for peer in peers
                        if peer.role == "primary" and peer.internal is not None), None)
        if primary is None:
            return f"replica holds {_figure(facts.external_cache)} entries"
        return (f"replica holds {_figure(facts.external_cache)} of the primary's "
                f"{primary.internal} entries")
    held = [f"peer {peer.address} holds {peer.external} of "
            f"{_figure(facts.internal_cache)} entries"
            for peer in peers if peer.external is not None]
    return "; ".join(held) or f"holds {_figure(facts.internal_cache)} entries"


def _figure(value):
    return "?" if value is None else str(value)


# -- health.json ----------------------------------------------------------------------


def parse_report(data):
    """The HealthReport in health.json's data; None if it holds none.

    The file is untrusted input: a report without a valid check time and interval
    is none; a peer, problem or field of the wrong type or size is left out.
    """
    if not isinstance(data, dict):
        return None
    checked = _number(data.get("checked"))
    interval = _number(data.get("interval"))
    if checked is None or interval is None or interval <= 0:
        return None
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
