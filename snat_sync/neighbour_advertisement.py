"""Unsolicited IPv6 neighbour advertisements: what a gratuitous ARP is to IPv4.

An advertisement for one of the router's addresses, sent to all nodes (ff02::1)
with the override flag, makes every neighbour that has the address cached take
this port's MAC for it, and the switches learn the MAC from the frame, as from a
gratuitous ARP (RFC 4861, 7.2.6). The router flag is set: the sender forwards, and
a neighbour that uses it as default router keeps it (RFC 4861, 7.2.5).

`packet` is pure. `send` opens a raw ICMPv6 socket, so it runs inside the router's
namespace: announce.py starts `python3 -m snat_sync.neighbour_advertisement DEVICE
ADDRESS` there with nsenter, as it starts arping for IPv4. The kernel fills in the
ICMPv6 checksum and the source (the port's link-local address).
"""

import argparse
import fcntl
import ipaddress
import socket
import struct
import sys

ALL_NODES = "ff02::1"
NEIGHBOUR_ADVERTISEMENT = 136
ROUTER_FLAG = 0x80
OVERRIDE_FLAG = 0x20
TARGET_LINK_LAYER_ADDRESS = 2  # option type; its length is counted in 8 octets
HOP_LIMIT = 255  # a receiver drops neighbour discovery that crossed a router
SIOCGIFHWADDR = 0x8927
MAC_LENGTH = 6


def packet(target, mac):
    """The ICMPv6 message (checksum left 0 for the kernel): router and override
    flags, the target address, and its link-layer address option."""
    if len(mac) != MAC_LENGTH:
        raise ValueError(f"a MAC is {MAC_LENGTH} bytes, not {len(mac)}")
    header = struct.pack("!BBHB3x", NEIGHBOUR_ADVERTISEMENT, 0, 0,
                         ROUTER_FLAG | OVERRIDE_FLAG)
    option = struct.pack("!BB", TARGET_LINK_LAYER_ADDRESS, 1) + mac
    return header + ipaddress.IPv6Address(target).packed + option


def device_mac(device):
    """The MAC of device in this namespace (OSError if there is no such device)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16s16x", device.encode())
        answer = fcntl.ioctl(probe.fileno(), SIOCGIFHWADDR, request)
    return answer[18:18 + MAC_LENGTH]


def send(device, target):
    """Send one advertisement for target out of device, in this namespace."""
    message = packet(target, device_mac(device))
    index = socket.if_nametoindex(device)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW,
                       socket.IPPROTO_ICMPV6) as raw:
        raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, HOP_LIMIT)
        raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        raw.sendto(message, (ALL_NODES, 0, 0, index))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m snat_sync.neighbour_advertisement",
        description="Send one unsolicited IPv6 neighbour advertisement (router and "
                    "override flags) for ADDRESS out of DEVICE, in the current "
                    "network namespace: IPv6's gratuitous ARP. Needs CAP_NET_RAW.")
    parser.add_argument("device", help="the port that holds the address")
    parser.add_argument("address", help="the IPv6 address to announce")
    arguments = parser.parse_args(argv)
    try:
        target = ipaddress.IPv6Address(arguments.address)
    except ValueError:
        parser.error(f"{arguments.address!r} is not an IPv6 address")
    try:
        send(arguments.device, target)
    except OSError as failure:
        print(f"neighbour advertisement for {target} on {arguments.device}: "
              f"{failure.strerror or failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
