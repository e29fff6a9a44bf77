"""The router model: what snat-sync needs to know about one HA router.

A `RouterSpec` is built only through `RouterSpec.create`, which checks every field
against the rules of the kernel and of conntrackd. Every name that later becomes part
of a path, a command argument or a configuration file passes through here first, so
nothing downstream has to worry about quoting or injection.
"""

import dataclasses
import ipaddress
import re

from snat_sync.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class NamespaceFacts:
    """What verification learned from the router's namespace (namespace.gather_facts);
    rendering needs it beside the spec."""

    ha_network: ipaddress.IPv4Network | ipaddress.IPv6Network
    nf_conntrack_max: int


ROUTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# ip-netns(8) names become file names under /run/netns.
NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# The kernel allows up to 15 bytes and no '/', ':' or whitespace; we also refuse
# anything a shell or a config parser could treat specially. conntrackd's config
# lexer reads an interface name only as a word [a-zA-Z][a-zA-Z0-9._-]*: a name that
# starts with a digit or holds '@' is a syntax error in conntrackd.conf.
INTERFACE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,14}")
# Words conntrackd's lexer (1.4.7) takes for something else than a name: its
# keywords, its booleans and mode names (any case), and up to four hex digits (an
# IPv6 address). As an interface name each is a syntax error.
CONNTRACKD_KEYWORDS = frozenset("""
    UNIX IPv4_address IPv6_address IPv4_Destination_Address IPv6_Destination_Address
    IPv4_interface IPv6_interface Interface Multicast UDP TCP HashSize RefreshTime
    CacheTimeout CommitTimeout HashLimit Path Backlog Group Port LogFile Syslog
    LockFile General Sync Stats SocketBufferSize SocketBufferSizeMaxGrown
    SocketBufferSizeMaxGrowth NetlinkBufferSize NetlinkBufferSizeMaxGrowth Mode
    ResendQueueSize Checksum ACKWindowSize for SYN_SENT SYN_RECV ESTABLISHED FIN_WAIT
    CLOSE_WAIT LAST_ACK TIME_WAIT CLOSE CLOSED LISTEN SndSocketBuffer RcvSocketBuffer
    Filter Protocol Address State Accept Ignore PurgeTimeout From Userspace
    Kernelspace EventIterationLimit Default PollSecs NetlinkOverrunResync Nice
    Scheduler Type Priority NetlinkEventsReliable DisableInternalCache
    DisableExternalCache Options TCPWindowTracking ExpectationSync ErrorQueueLength
    Helper QueueNum QueueLen Policy ExpectMax ExpectTimeout Systemd StartupResync
""".split())
CONNTRACKD_WORDS_ANY_CASE = frozenset(
    "on off yes no ftfw alarm nack notrack persistent".split())
CONNTRACKD_HEX_WORD = re.compile(r"[0-9A-Fa-f]{1,4}")
VRID_RANGE = range(1, 255)
TRANSPORTS = ("auto", "udp", "multicast")


@dataclasses.dataclass(frozen=True)
class SyncChannel:
    """Where one router's conntrackd sends and receives sync messages."""

    transport: str  # "udp" or "multicast"
    port: int
    multicast_group: str


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    router_id: str
    namespace: str
    ha_interface: str
    local_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    peer_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    vrid: int
    # The address keepalived puts on the HA interface while this node is primary
    # (Neutron: 169.254.0.<VRID>/24); the daemon's role watcher looks for it.
    primary_address: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None

    @classmethod
    def create(
        cls, router_id, namespace, ha_interface, local_address, peer_addresses, vrid,
        primary_address=None,
    ):
        """Check every field; raise InvalidInput naming the first bad one."""
        local = _address("local address", local_address)
        if isinstance(peer_addresses, (str, bytes)) or not isinstance(
                peer_addresses, (list, tuple)):
            raise InvalidInput("peer address", peer_addresses,
                               "expected a list of addresses")
        if not peer_addresses and primary_address is None:
            # Neutron gives an agent only its own HA port: its routers are added
            # without peers (and with their primary address), and sync by multicast.
            raise InvalidInput("peer address", "", "at least one peer is required")
        peers = tuple(_address("peer address", peer) for peer in peer_addresses)
        for peer in peers:
            if peer == local:
                raise InvalidInput(
                    "peer address", str(peer), "is the router's own local address"
                )
            if peer.version != local.version:
                raise InvalidInput(
                    "peer address",
                    str(peer),
                    f"local address {local} is IPv{local.version}",
                )
        if len(set(peers)) != len(peers):
            raise InvalidInput(
                "peer address", ", ".join(map(str, peers)), "a peer is given twice"
            )
        return cls(
            router_id=_name("router id", router_id, ROUTER_ID),
            namespace=_name("namespace", namespace, NAMESPACE),
            ha_interface=_interface(ha_interface),
            local_address=local,
            peer_addresses=peers,
            vrid=_vrid(vrid),
            primary_address=_primary_address(primary_address, local, peers),
        )

    @property
    def has_one_peer(self):
        """One listed peer: the router's pair is all of it. With several, or with
        peers learned by multicast (none listed: Neutron's routers, on up to
        max_l3_agents_per_router nodes), another backup may hear the primary too."""
        return len(self.peer_addresses) == 1

    def sync_channel(self, transport, base_port, multicast_group):
        """Pick the transport and port this router's conntrackd uses.

        conntrackd's UDP transport has one destination per link, so several peers
        need multicast. The port is base_port + VRID: routers of one project share
        its HA network and must not read each other's messages. multicast_group
        is of the HA addresses' family.
        """
        if transport not in TRANSPORTS:
            raise InvalidInput("transport", transport,
                               f"must be one of {', '.join(TRANSPORTS)}")
        if (isinstance(base_port, bool) or not isinstance(base_port, int)
                or not 1 <= base_port + self.vrid <= 65535):
            raise InvalidInput("base port", base_port,
                               f"base port + VRID {self.vrid} must be a UDP port")
        if transport == "auto":
            transport = "udp" if len(self.peer_addresses) == 1 else "multicast"
        if transport == "udp" and len(self.peer_addresses) != 1:
            raise InvalidInput(
                "peer address",
                ", ".join(map(str, self.peer_addresses)),
                "the udp transport takes exactly one peer; use multicast for several",
            )
        if transport == "multicast":
            try:
                group = ipaddress.ip_address(multicast_group)
            except ValueError:
                raise InvalidInput("multicast group", multicast_group,
                                   "not an address") from None
            if group.version != self.local_address.version or not group.is_multicast:
                raise InvalidInput(
                    "multicast group", multicast_group,
                    f"not an IPv{self.local_address.version} multicast group, as the "
                    f"local address {self.local_address} needs")
        return SyncChannel(transport, base_port + self.vrid, multicast_group)

    def to_dict(self):
        return {
            "router": self.router_id,
            "namespace": self.namespace,
            "ha_interface": self.ha_interface,
            "local_address": str(self.local_address),
            "peer_addresses": [str(peer) for peer in self.peer_addresses],
            "vrid": self.vrid,
            **({"primary_address": str(self.primary_address)}
               if self.primary_address is not None else {}),
        }

    @classmethod
    def from_dict(cls, data):
        """The spec a to_dict() gave, checked again: spec.json may have been changed."""
        keys = ("router", "namespace", "ha_interface", "local_address",
                "peer_addresses", "vrid")
        if not isinstance(data, dict) or not all(key in data for key in keys):
            raise InvalidInput("router spec", data,
                               f"expected a mapping with the keys {', '.join(keys)}")
        return cls.create(
            data["router"],
            data["namespace"],
            data["ha_interface"],
            data["local_address"],
            data["peer_addresses"],
            data["vrid"],
            data.get("primary_address"),
        )


def check_router_id(router_id):
    return _name("router id", router_id, ROUTER_ID)


def _name(field, value, pattern):
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(
            field,
            value,
            f"must match {pattern.pattern} (letters, digits and . _ -; no '/', "
            "spaces or shell characters)",
        )
    if value in (".", "..") or ".." in value:
        raise InvalidInput(field, value, "must not contain '..'")
    return value


def _interface(value):
    """An interface name the kernel, nft and conntrackd's config parser all take."""
    name = _name("HA interface", value, INTERFACE)
    if (name in CONNTRACKD_KEYWORDS or name.lower() in CONNTRACKD_WORDS_ANY_CASE
            or CONNTRACKD_HEX_WORD.fullmatch(name)):
        raise InvalidInput("HA interface", value,
                           "conntrackd's config parser reads this name as a keyword "
                           "or an address, not as an interface")
    if name == "lo":
        raise InvalidInput("HA interface", value, "the loopback is no HA network")
    return name


def _address(field, value):
    if not isinstance(value, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise InvalidInput(field, value, "not an IPv4 or IPv6 address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidInput(field, value, "not an IPv4 or IPv6 address") from None
    if getattr(address, "scope_id", None) is not None:
        raise InvalidInput(field, value, "must not carry a %scope")
    if (address.is_multicast or address.is_unspecified or address.is_loopback
            or (address.version == 4 and address.is_reserved)
            or (address.version == 6 and address.ipv4_mapped is not None)):
        raise InvalidInput(field, value, "must be a unicast address of the HA network")
    return address


def _primary_address(value, local, peers):
    """The VRRP address as an interface (address/prefix); None when not given."""
    if value is None:
        return None
    if not isinstance(value, (str, ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        raise InvalidInput("primary address", value, "not an address/prefix")
    try:
        interface = ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidInput("primary address", value,
                           "not an address/prefix such as 169.254.0.7/24") from None
    _address("primary address", str(interface.ip))
    if interface.version != local.version:
        raise InvalidInput("primary address", value,
                           f"local address {local} is IPv{local.version}")
    if interface.ip == local or interface.ip in peers:
        raise InvalidInput("primary address", value,
                           "is the local or a peer address; it must be the address "
                           "only the primary holds")
    return interface


def _vrid(value):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidInput("VRID", value, "not a whole number")
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,3}", value):
        raise InvalidInput("VRID", value, "not a whole number")
    vrid = int(value)
    if str(value) != str(vrid) or vrid not in VRID_RANGE:
        raise InvalidInput("VRID", value, "must be a whole number from 1 to 254")
    return vrid
