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

Whom reports go to and whom they are believed from is the router's Audience.
A router with peer addresses in its spec sends to each by unicast and believes
only them. A router without (a Neutron router: the agent knows only its own HA
port) sends to a multicast group on its HA interface ([conntrackd]
multicast_group or ipv6_multicast_group, the one conntrackd uses, on the report
port) and believes any other address of its HA network: its peers are learned
from the reports, keyed by source address, and a learned peer not heard for
FORGET_AFTER_TIMEOUTS x [health] peer_timeout is forgotten (`current_reports`),
so a node that left the router stops counting. Our own multicast is not looped
back, and our own address is never believed either.

A report is believed only from an address the audience accepts, for the same
router (routers sharing a group are told apart by it and by the port), and when
every field is of the expected type and size; anything else is dropped. The HA
network carries conntrackd's unauthenticated sync traffic too: whoever can write
to it can already corrupt the replica, so reports add no new trust. The protocol
(encode/decode, and the audience's decisions) is kept apart from the socket
(ReportChannel).
"""

import dataclasses
import errno
import ipaddress
import json
import math
import socket
import struct

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


# A learned peer silent for this many [health] peer_timeout is forgotten: by
# then it has been reported silent (degraded) for five timeouts, long enough for
# a node to reboot; a node removed from the router does not stay a silent peer.
FORGET_AFTER_TIMEOUTS = 6
# At most this many learned peers are kept (Neutron: max_l3_agents_per_router,
# default 3), so that a flood of forged sources cannot grow the daemon.
MAX_LEARNED_PEERS = 16


@dataclasses.dataclass(frozen=True)
class Audience:
    """Whom a router's reports go to and whom they are believed from.

    peers: the spec's peer addresses (unicast); empty when they are learned, then
    network is the HA network and group the multicast group, and excluded holds
    this node's own addresses (its HA address, the primary address).
    """

    peers: tuple = ()
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    group: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    excluded: frozenset = frozenset()

    @property
    def learned(self):
        return not self.peers

    @property
    def destinations(self):
        return self.peers if self.peers else (self.group,)

    def accepts(self, address):
        if self.peers:
            return address in self.peers
        return (address.version == self.network.version and address in self.network
                and address not in self.excluded)


def audience_for(spec, ha_network, multicast_group, ipv6_multicast_group):
    """The spec's peers when it lists them, else the multicast group of the HA
    addresses' family and any other address of ha_network."""
    if spec.peer_addresses:
        return Audience(peers=spec.peer_addresses)
    group = ipaddress.ip_address(
        ipv6_multicast_group if spec.local_address.version == 6 else multicast_group)
    excluded = {spec.local_address}
    if spec.primary_address is not None:
        excluded.add(spec.primary_address.ip)
    return Audience(network=ha_network, group=group, excluded=frozenset(excluded))


def current_reports(reports, listed_peers, now, peer_timeout):
    """The reports to keep, {address: PeerReport}: all of them for a router with
    listed peers (only theirs are accepted); of learned peers those heard within
    FORGET_AFTER_TIMEOUTS x peer_timeout, the most recently heard
    MAX_LEARNED_PEERS."""
    if listed_peers:
        return dict(reports)
    recent = sorted((report for report in reports.values()
                     if now - report.received <= FORGET_AFTER_TIMEOUTS * peer_timeout),
                    key=lambda report: report.received, reverse=True)
    return {report.address: report for report in recent[:MAX_LEARNED_PEERS]}


def expected_peers(listed_peers, reports):
    """The peers whose silence counts: the listed ones, else the learned ones
    (the addresses of the reports kept)."""
    if listed_peers:
        return tuple(listed_peers)
    return tuple(sorted(map(ipaddress.ip_address, reports)))


def encode_report(router_id, role, changed, internal, external, kernel, now,
                  taken=None, standby=None):
    """A version 2 report; taken defaults to now, internal/external may be None."""
    return json.dumps({
        "v": VERSION, "router": router_id, "role": role, "standby": standby,
        "changed": changed, "taken": round(now if taken is None else taken, 3),
        "internal": internal, "external": external, "kernel": kernel,
        "sent": round(now, 3),
    }, separators=(",", ":")).encode()


def decode_report(data, source, router_id, audience, received):
    """The PeerReport in a datagram, or None when it is not a valid report for us
    (audience: whom the router believes)."""
    if len(data) > MAX_REPORT_SIZE:
        return None
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return None
    if not audience.accepts(address):
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
    """The router's report socket: UDP, in its namespace, on the HA network.

    With listed peers it is bound to the HA address and sends to each peer. With
    learned peers it is bound to the multicast group (so it reads only the
    group's datagrams on that port), joins it on the HA interface (ifindex, in
    the namespace), sends to it from the HA address with loopback off and hop
    limit 1.

    Created through pyroute2, which opens it in a short-lived child that joins
    the namespace and passes the descriptor back, so no thread of the daemon
    ever changes namespace.
    """

    def __init__(self, spec, port, audience, ifindex=None):
        self.spec = spec
        self.port = port
        self.audience = audience
        self.ifindex = ifindex
        self.family = (socket.AF_INET6 if spec.local_address.version == 6
                       else socket.AF_INET)
        self.socket = pyroute2_netns.create_socket(
            spec.namespace, self.family, socket.SOCK_DGRAM, flags=0)
        try:
            self.socket.setblocking(False)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if audience.learned:
                self._join_group()
            else:
                self.socket.bind((str(spec.local_address), port))
        except OSError:
            self.socket.close()
            raise

    def _join_group(self):
        group, local = self.audience.group, self.spec.local_address
        if self.family == socket.AF_INET6:
            self.socket.bind((str(group), self.port, 0, self.ifindex))
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                                   group.packed + struct.pack("@I", self.ifindex))
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF,
                                   self.ifindex)
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        else:
            self.socket.bind((str(group), self.port))
            # struct ip_mreqn: group, our address (the source), interface index
            mreqn = group.packed + local.packed + struct.pack("@i", self.ifindex)
            self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
            self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            self.socket.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)

    def fileno(self):
        return self.socket.fileno()

    def send(self, payload):
        """Send the report to every destination; one that cannot be reached is
        skipped. EPERM is a firewall in the namespace dropping the datagram on
        its way out (a partitioned HA link): the check that sends the report
        must go on to judge the router, as it does when the peer is silent."""
        for destination in self.audience.destinations:
            try:
                self._send_to(payload, str(destination))
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.ENETUNREACH,
                                       errno.EHOSTUNREACH, errno.ECONNREFUSED,
                                       errno.EPERM):
                    raise

    def _send_to(self, payload, destination):
        if self.audience.learned and self.family == socket.AF_INET6:
            # The socket is bound to the group: name the HA address as the
            # source, or the kernel would pick the link-local one for ff12::.
            pktinfo = self.spec.local_address.packed + struct.pack("@I", self.ifindex)
            self.socket.sendmsg([payload], [(socket.IPPROTO_IPV6,
                                             socket.IPV6_PKTINFO, pktinfo)],
                                0, (destination, self.port, 0, self.ifindex))
        else:
            self.socket.sendto(payload, (destination, self.port))

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
                                   self.audience, received)
            if report is not None:
                reports.append(report)

    def close(self):
        self.socket.close()
