"""Health reports the node daemons of a router's nodes send each other.

A backup cannot tell from its own figures whether its replica follows the primary:
it needs the primary's count. So at every health check each daemon sends its
peers one small UDP datagram from inside the router's namespace, on the HA
network, on port [health] base_port + VRID:

    {"v": 2, "router": "<id>", "role": "backup", "standby": "warm",
     "changed": 1764000000.1, "taken": 1764000000.4, "internal": 0,
     "external": 0, "kernel": 20212, "sent": 1764000000.5}

`changed` is when the sender's last transition arrived and `taken` when its
figures were read, both by the sender's clock: the receiver compares them only
with the same peer's earlier reports or with its `sent`, so the nodes' clocks
need not agree. `kernel` is read from /proc and always there; `internal` and
`external` come from conntrackd's control socket and are null while it is too
busy to answer, so a report still goes out every check. `standby` says which
figure is the sender's replica: its kernel table (warm) or its external cache
(cold).

Version 2 added `taken`, `standby` and the null caches. Version 1 reports are
still accepted (as taken when sent, standby unknown): in a rolling upgrade the
upgraded node must understand the one not yet upgraded, or it would find its
primary silent and `snat-sync wait` would hold the upgrade back. The old release
drops version 2 reports, so until it is upgraded too it shows its peer silent.

A report is believed only from one of the router's peer addresses, for the same
router, and when every field is of the expected type and size; anything else is
dropped. The HA network carries conntrackd's unauthenticated sync traffic too:
whoever can write to it can already corrupt the replica, so reports add no new
trust. The protocol (encode/decode) is kept apart from the socket (ReportChannel).
"""

import dataclasses
import errno
import ipaddress
import json
import math
import socket

from pyroute2 import netns as pyroute2_netns

from snat_sync.roles import Role

VERSION = 2
ACCEPTED_VERSIONS = (1, 2)
STANDBY_MODES = frozenset({"warm", "cold"})
# A report is about 150 bytes; anything much larger is not one of ours.
MAX_REPORT_SIZE = 1024
MAX_COUNT = 2**40
ROLES = frozenset(role.value for role in Role) | {"unknown"}


@dataclasses.dataclass(frozen=True)
class PeerReport:
    """What a peer's daemon said about the router, and when it reached us."""

    address: str
    role: str
    changed: float | None
    internal: int | None  # None: the sender's conntrackd did not answer in time
    external: int | None
    kernel: int | None
    sent: float
    received: float
    taken: float | None = None  # when the figures were read, sender's clock
    standby: str | None = None  # "warm", "cold"; None from a version 1 sender

    @property
    def figures_age(self):
        """How old the figures were when the report left (sender's clock)."""
        return max(self.sent - self.taken, 0.0) if self.taken is not None else 0.0

    def to_dict(self):
        return dataclasses.asdict(self)


def encode_report(router_id, role, changed, internal, external, kernel, now,
                  taken=None, standby=None):
    """A version 2 report; taken defaults to now, internal/external may be None."""
    return json.dumps({
        "v": VERSION, "router": router_id, "role": role, "standby": standby,
        "changed": changed, "taken": round(now if taken is None else taken, 3),
        "internal": internal, "external": external, "kernel": kernel,
        "sent": round(now, 3),
    }, separators=(",", ":")).encode()


def decode_report(data, source, router_id, peer_addresses, received):
    """The PeerReport in a datagram, or None when it is not a valid report for us."""
    if len(data) > MAX_REPORT_SIZE:
        return None
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return None
    if address not in peer_addresses:
        return None
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(message, dict):
        return None
    version = message.get("v")
    if (isinstance(version, bool) or version not in ACCEPTED_VERSIONS
            or message.get("router") != router_id
            or message.get("role") not in ROLES):
        return None
    internal, external = message.get("internal"), message.get("external")
    kernel, sent = message.get("kernel"), message.get("sent")
    changed = message.get("changed")
    if version == 1:  # the caches were always there; figures taken when sent
        if not (_is_count(internal) and _is_count(external)):
            return None
        taken, standby = sent, None
    else:
        taken, standby = message.get("taken"), message.get("standby")
        if not (_is_count_or_none(internal) and _is_count_or_none(external)):
            return None
        if not _is_time(taken) or not (standby is None or standby in STANDBY_MODES):
            return None
    if not _is_count_or_none(kernel):
        return None
    if not _is_time(sent) or not (changed is None or _is_time(changed)):
        return None
    return PeerReport(str(address), message["role"],
                      None if changed is None else float(changed), internal,
                      external, kernel, float(sent), received, float(taken), standby)


def _is_count_or_none(value):
    return value is None or _is_count(value)


def _is_time(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and (
        0 <= value <= MAX_COUNT)


def report_port(base_port, vrid):
    return base_port + vrid


class ReportChannel:
    """The router's report socket: UDP, bound to its HA address, in its namespace.

    Created through pyroute2, which opens it in a short-lived child that joins
    the namespace and passes the descriptor back, so no thread of the daemon
    ever changes namespace.
    """

    def __init__(self, spec, port):
        self.spec = spec
        self.port = port
        family = (socket.AF_INET6 if spec.local_address.version == 6
                  else socket.AF_INET)
        self.socket = pyroute2_netns.create_socket(
            spec.namespace, family, socket.SOCK_DGRAM, flags=0)
        try:
            self.socket.setblocking(False)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((str(spec.local_address), port))
        except OSError:
            self.socket.close()
            raise

    def fileno(self):
        return self.socket.fileno()

    def send(self, payload):
        """Send the report to every peer; a peer that cannot be reached is skipped."""
        for peer in self.spec.peer_addresses:
            try:
                self.socket.sendto(payload, (str(peer), self.port))
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.ENETUNREACH,
                                       errno.EHOSTUNREACH, errno.ECONNREFUSED):
                    raise

    def read(self, received):
        """Every report waiting on the socket, decoded; invalid ones dropped."""
        reports = []
        while True:
            try:
                data, source = self.socket.recvfrom(MAX_REPORT_SIZE + 1)
            except (BlockingIOError, InterruptedError):
                return reports
            except ConnectionRefusedError:  # an earlier send's ICMP error
                continue
            report = decode_report(data, source[0], self.spec.router_id,
                                   self.spec.peer_addresses, received)
            if report is not None:
                reports.append(report)

    def close(self):
        self.socket.close()
