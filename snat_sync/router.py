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

ROUTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# ip-netns(8) names become file names under /run/netns.
NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# The kernel allows up to 15 bytes and no '/', ':' or whitespace; we also refuse
# anything a shell or a config parser could treat specially.
INTERFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}")
VRID_RANGE = range(1, 255)


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

    @classmethod
    def create(
        cls, router_id, namespace, ha_interface, local_address, peer_addresses, vrid
    ):
        """Check every field; raise InvalidInput naming the first bad one."""
        local = _address("local address", local_address)
        if not peer_addresses:
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
            ha_interface=_name("HA interface", ha_interface, INTERFACE),
            local_address=local,
            peer_addresses=peers,
            vrid=_vrid(vrid),
        )

    def sync_channel(self, transport, base_port, multicast_group):
        """Pick the transport and port this router's conntrackd uses.

        conntrackd's UDP transport has one destination per link, so several peers
        need multicast. The port is base_port + VRID: routers of one project share
        its HA network and must not read each other's messages.
        """
        if transport == "auto":
            transport = "udp" if len(self.peer_addresses) == 1 else "multicast"
        if transport == "udp" and len(self.peer_addresses) > 1:
            raise InvalidInput(
                "peer address",
                ", ".join(map(str, self.peer_addresses)),
                "the udp transport takes exactly one peer; use multicast for several",
            )
        if transport == "multicast" and self.local_address.version != 4:
            raise InvalidInput(
                "local address",
                str(self.local_address),
                "the multicast transport is IPv4 only",
            )
        return SyncChannel(transport, base_port + self.vrid, multicast_group)

    def to_dict(self):
        return {
            "router": self.router_id,
            "namespace": self.namespace,
            "ha_interface": self.ha_interface,
            "local_address": str(self.local_address),
            "peer_addresses": [str(peer) for peer in self.peer_addresses],
            "vrid": self.vrid,
        }

    @classmethod
    def from_dict(cls, data):
        return cls.create(
            data["router"],
            data["namespace"],
            data["ha_interface"],
            data["local_address"],
            data["peer_addresses"],
            data["vrid"],
        )


def check_router_id(router_id):
    return _name("router id", router_id, ROUTER_ID)


def _name(field, value, pattern):
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(
            field,
            value,
            f"must match {pattern.pattern} (letters, digits and . _ -"
            f"{' @' if pattern is INTERFACE else ''}; no '/', spaces or shell "
            "characters)",
        )
    if value in (".", "..") or ".." in value:
        raise InvalidInput(field, value, "must not contain '..'")
    return value


def _address(field, value):
    try:
        address = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise InvalidInput(field, value, "not an IPv4 or IPv6 address") from None
    if getattr(address, "scope_id", None) is not None:
        raise InvalidInput(field, value, "must not carry a %scope")
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        raise InvalidInput(field, value, "must be a unicast address of the HA network")
    return address


def _vrid(value):
    try:
        vrid = int(value)
    except (TypeError, ValueError):
        raise InvalidInput("VRID", value, "not a whole number") from None
    if str(value).strip() != str(vrid) or vrid not in VRID_RANGE:
        raise InvalidInput("VRID", value, "must be a whole number from 1 to 254")
    return vrid
