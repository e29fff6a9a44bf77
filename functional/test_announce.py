"""A survivor's announcements move its neighbours' cached MACs to it, IPv4 and IPv6.

A router namespace with two ports towards one neighbour namespace: a dual-stack port
(IPv4 and IPv6) and an IPv6-only port. The neighbour caches each router address
with a MAC that is not the router's, as it would after the peer that yielded had
answered for it. snat_sync.announce then announces the router's addresses, as the
survivor's repair does after a partition heals: every cached entry must hold the
router port's MAC, the IPv6 ones by the unsolicited neighbour advertisement (with
the router flag), the IPv4 one by the gratuitous ARP.
"""

import ipaddress
import time

import pytest

from snat_sync import announce
from snat_sync.lab import topology as lab_module

WRONG_MAC = "02:00:00:00:00:99"
PORTS = {  # router port -> (neighbour port, router addresses, neighbour addresses)
    "dual": ("dual-n", ["192.0.2.1/24", "2001:db8:a::1/64"],
             ["192.0.2.2/24", "2001:db8:a::2/64"]),
    "v6only": ("v6only-n", ["2001:db8:b::1/64"], ["2001:db8:b::2/64"]),
}


def ip(namespace, *args):
    return lab_module.ip(*args, namespace=namespace).stdout


@pytest.fixture
def router_and_neighbour():
    prefix = lab_module.new_prefix()
    router, neighbour = f"{prefix}-announcer", f"{prefix}-neighbour"
    try:
        for namespace in (router, neighbour):
            lab_module.ip("netns", "add", namespace)
            lab_module.run(["sysctl", "-q", "-w",
                            "net.ipv6.conf.default.accept_dad=0"], namespace=namespace)
        for port, (peer, router_addresses, neighbour_addresses) in PORTS.items():
            ip(router, "link", "add", port, "type", "veth", "peer", "name", peer,
               "netns", neighbour)
            for namespace, device, addresses in ((router, port, router_addresses),
                                                 (neighbour, peer,
                                                  neighbour_addresses)):
                for address in addresses:
                    ip(namespace, "address", "add", address, "dev", device, "nodad")
                ip(namespace, "link", "set", device, "up")
        for port, (peer, _, _) in PORTS.items():
            wait_until_ipv6_ready(router, port)
            wait_until_ipv6_ready(neighbour, peer)
        yield router, neighbour
    finally:
        for namespace in (router, neighbour):
            lab_module.ip("netns", "delete", namespace, check=False)


def wait_until_ipv6_ready(namespace, device, timeout=5):
    """IPv6 on a port is up once the carrier is seen (the kernel's link watch, up
    to a second after `link set up`) and the link-local address is configured;
    before that the neighbour ignores advertisements. A survivor's ports have long
    been up."""
    deadline = time.monotonic() + timeout
    while "fe80:" not in ip(namespace, "-6", "address", "show", "dev", device,
                            "scope", "link", "-tentative"):
        assert time.monotonic() < deadline, f"{device} in {namespace}: no IPv6"
        time.sleep(0.05)


def mac_of(namespace, device):
    return ip(namespace, "-br", "link", "show", device).split()[2]


def cached(namespace, device, address):
    """The neighbour entry's fields for address on device ("" if none)."""
    family = "-6" if ipaddress.ip_address(address).version == 6 else "-4"
    return ip(namespace, family, "neigh", "show", address, "dev", device).split()


def router_addresses():
    for port, (peer, addresses, _) in PORTS.items():
        for address in addresses:
            yield port, peer, address.split("/")[0]


def test_the_survivor_announces_every_address_ipv6_only_ports_too(
        router_and_neighbour):
    router, neighbour = router_and_neighbour
    for _port, peer, address in router_addresses():
        ip(neighbour, "neigh", "replace", address, "lladdr", WRONG_MAC, "dev", peer,
           "nud", "stale")
        assert WRONG_MAC in cached(neighbour, peer, address)

    sent = announce.announce_addresses(router)

    assert sorted((each.device, str(each.address)) for each in sent) == sorted(
        (port, address) for port, _peer, address in router_addresses())
    deadline = time.monotonic() + 2
    while True:
        found = {address: cached(neighbour, peer, address)
                 for _port, peer, address in router_addresses()}
        expected = {address: mac_of(router, port)
                    for port, _peer, address in router_addresses()}
        if all(expected[address] in fields for address, fields in found.items()):
            break
        assert time.monotonic() < deadline, (found, expected)
        time.sleep(0.05)
    for address, fields in found.items():
        if ipaddress.ip_address(address).version == 6:
            assert "router" in fields, fields
