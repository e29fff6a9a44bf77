"""The role watcher's decisions, on address events as pyroute2 decodes them."""

import ipaddress

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from snat_sync.roles import (ADDRESS_ADDED, ADDRESS_REMOVED, AddressEvent, Role,
                             address_event, role_change)

PRIMARY = ipaddress.ip_interface("169.254.0.7/24")
HA = "ha-1a2b3c4d-5e"


def message(event, address, prefixlen=24, label=HA, family=2):
    decoded = ifaddrmsg()
    decoded["family"] = family
    decoded["prefixlen"] = prefixlen
    decoded["index"] = 3
    decoded["attrs"] = [("IFA_ADDRESS", address), ("IFA_LOCAL", address)]
    if label is not None:
        decoded["attrs"].append(("IFA_LABEL", label))
    decoded["event"] = event
    return decoded


def event(kind, interface="169.254.0.7/24", label=HA):
    return AddressEvent(kind, ipaddress.ip_interface(interface), label)


def test_the_primary_address_appearing_means_primary():
    assert role_change(event(ADDRESS_ADDED), PRIMARY, HA) is Role.PRIMARY


def test_the_primary_address_disappearing_means_backup():
    assert role_change(event(ADDRESS_REMOVED), PRIMARY, HA) is Role.BACKUP


@pytest.mark.parametrize("changed", [
    event(ADDRESS_ADDED, "169.254.0.8/24"),
    event(ADDRESS_ADDED, "169.254.0.7/32"),
    event(ADDRESS_ADDED, label="qr-1234"),
    event("RTM_NEWLINK"),
])
def test_other_events_say_nothing(changed):
    assert role_change(changed, PRIMARY, HA) is None


def test_an_ipv6_event_has_no_label_and_matches_by_address():
    primary = ipaddress.ip_interface("fe80::7/64")
    assert role_change(event(ADDRESS_ADDED, "fe80::7/64", None), primary,
                       HA) is Role.PRIMARY


def test_address_event_reads_a_decoded_netlink_message():
    assert address_event(message("RTM_NEWADDR", "169.254.0.7")) == event(ADDRESS_ADDED)
    assert address_event(message("RTM_DELADDR", "169.254.0.7", label=None)) == event(
        ADDRESS_REMOVED, label=None)


def test_address_event_skips_other_messages():
    assert address_event(message("RTM_NEWLINK", "169.254.0.7")) is None
