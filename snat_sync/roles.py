"""The shared vocabulary of roles: what both the edges and the decisions speak.

`Role` is the VRRP role a router takes (failover decides the steps for it, health
and repair judge by it, reports carry it); `AddressEvent`, `address_event` and
`role_change` turn a netlink address message into the role it says the node took
(the daemon's watcher and namespace.holds_address both ask it). Nothing here
imports another snat_sync module, so any module may import it.
"""

import dataclasses
import enum
import ipaddress


class Role(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"
    FAULT = "fault"
    STOP = "stop"


ADDRESS_ADDED = "RTM_NEWADDR"
ADDRESS_REMOVED = "RTM_DELADDR"


@dataclasses.dataclass(frozen=True)
class AddressEvent:
    """One netlink address message, reduced to what the decision needs."""

    kind: str  # ADDRESS_ADDED or ADDRESS_REMOVED
    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    label: str | None  # the interface name (IPv4 only), else None


def role_change(event, primary_address, ha_interface):
    """The role an address event says the node took, or None if it says nothing.

    The primary address appearing means keepalived made this node primary; its
    disappearing means it left that role (backup is what the node does next,
    whether keepalived went to BACKUP, FAULT or was stopped).
    """
    if event.interface != primary_address:
        return None
    if event.label is not None and event.label != ha_interface:
        return None
    if event.kind == ADDRESS_ADDED:
        return Role.PRIMARY
    if event.kind == ADDRESS_REMOVED:
        return Role.BACKUP
    return None


def address_event(message):
    """The AddressEvent of a pyroute2 address message; None if it is none."""
    kind = message.get("event")
    address = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
    if kind not in (ADDRESS_ADDED, ADDRESS_REMOVED) or address is None:
        return None
    try:
        interface = ipaddress.ip_interface(f"{address}/{message['prefixlen']}")
    except ValueError:
        return None
    return AddressEvent(kind, interface, message.get_attr("IFA_LABEL"))
