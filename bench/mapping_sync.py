"""Benchmark: what mapping sync (snat_sync/mapping_sync.py) costs the primary's
daemon.

The daemon listens for new-entry events on a socket whose BPF filter passes only
the protocols whose translated port conntrackd does not replicate (ICMP, ICMPv6,
SCTP, DCCP) and expectations. In one fresh namespace, with that listener and an
unfiltered new-entry socket open side by side:

- --tcp SNAT'ed TCP entries are created (batched ctnetlink requests): how many
  events reach each socket (the filtered one should get none);
- --icmp ping entries whose identifier SNAT remapped are created: how long the
  listener takes to read and parse their events, and how long reading each entry
  back from the kernel and building its replacement takes (what a send costs
  before the network), per entry.

    python3 bench/mapping_sync.py [--tcp 200000] [--icmp 10000] [--json FILE]

Root. The namespace `ssb-<hex>-mapsync` is deleted however the run ends; the global
nf_conntrack_max and hash size are raised for the entries and restored after.
"""

import argparse
import errno
import ipaddress
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from snat_sync import ctnetlink  # noqa: E402
from snat_sync import mapping_sync  # noqa: E402
from snat_sync import options  # noqa: E402
from snat_sync import table_transfer  # noqa: E402

GATEWAY = ipaddress.ip_address("203.0.113.10").packed
BATCH = 256


def entry_request(index, protocol):
    """Entry index: a client of 10.64.0.0/10 to a server of 198.18.0.0/20,
    SNAT'ed to the gateway; a ping's identifier remapped to another (as when two
    clients ping with the same one)."""
    client = (ipaddress.ip_address("10.64.0.0") + index).packed
    # Servers enough that one gateway address has ports for every flow.
    server = (ipaddress.ip_address("198.18.0.0") + index % 4096).packed
    if protocol == socket.IPPROTO_ICMP:
        identifier = (index % 60000 + 1).to_bytes(2, "big")
        public = ((index + 1000) % 60000 + 1).to_bytes(2, "big")

        def ports(icmp_type):
            return [ctnetlink.attribute(ctnetlink.CTA_PROTO_ICMP_ID, identifier),
                    ctnetlink.attribute(5, bytes([icmp_type])),
                    ctnetlink.attribute(6, b"\0")]
        original_ports, reply_ports = ports(8), ports(0)
    else:
        # SNAT to the address alone: the kernel keeps the port where it is free.
        public = None
        client_port, server_port = (40000 + index % 20000).to_bytes(2, "big"), (
            443).to_bytes(2, "big")
        original_ports = [ctnetlink.attribute(ctnetlink.CTA_PROTO_SRC_PORT, client_port),
                          ctnetlink.attribute(ctnetlink.CTA_PROTO_DST_PORT, server_port)]
        reply_ports = [ctnetlink.attribute(ctnetlink.CTA_PROTO_SRC_PORT, server_port),
                       ctnetlink.attribute(ctnetlink.CTA_PROTO_DST_PORT, client_port)]

    def one_tuple(kind, source, destination, protocol_parts):
        return ctnetlink.nested(kind, ctnetlink.nested(
            ctnetlink.CTA_TUPLE_IP, ctnetlink.attribute(ctnetlink.CTA_IP_V4_SRC, source),
            ctnetlink.attribute(ctnetlink.CTA_IP_V4_DST, destination)),
            ctnetlink.nested(ctnetlink.CTA_TUPLE_PROTO,
                             ctnetlink.attribute(ctnetlink.CTA_PROTO_NUM, bytes([protocol])),
                             *protocol_parts))
    payload = (b"\x02\0\0\0"
               + one_tuple(ctnetlink.CTA_TUPLE_ORIG, client, server, original_ports)
               + one_tuple(ctnetlink.CTA_TUPLE_REPLY, server, client, reply_ports)
               + ctnetlink.attribute(7, (600).to_bytes(4, "big"))  # CTA_TIMEOUT
               + ctnetlink.nat_attribute(ctnetlink.CTA_NAT_SRC, GATEWAY, public))
    return ctnetlink.message(ctnetlink.CT_NEW, ctnetlink.CREATE_FLAGS, payload)


def create(namespace, first, count, protocol):
    netlink = table_transfer.netlink_socket(namespace)
    failed = 0
    try:
        for start in range(first, first + count, BATCH):
            netlink.send(b"".join(entry_request(index, protocol) for index in
                                  range(start, min(start + BATCH, first + count))))
        netlink.setblocking(False)
        try:
            while True:
                failed += len(ctnetlink.errors(netlink.recv(1 << 20)))
        except BlockingIOError:
            pass
    finally:
        netlink.close()
    return failed


def drain(netlink):
    """(events, overruns) waiting on an event socket."""
    netlink.setblocking(False)
    events = overruns = 0
    while True:
        try:
            chunk = netlink.recv(1 << 20)
        except BlockingIOError:
            return events, overruns
        except OSError as error:
            if error.errno != errno.ENOBUFS:
                raise
            overruns += 1
            continue
        events += len(ctnetlink.split_messages(chunk))


def measure(tcp, icmp):
    with common.Bench("mapsync") as bench:
        namespace = bench.namespace("mapsync")
        # A nat-table rule makes the namespace register NAT, as a router's has.
        common.sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT",
                  namespace=namespace)
        selection = ctnetlink.Selection.of(options.SYNCED_PROTOCOLS,
                                           ["127.0.0.0/8", "::1/128"])
        listener = mapping_sync.MappingListener(namespace, selection, ["all"])
        unfiltered = table_transfer.netlink_socket(
            namespace, 1 << (ctnetlink.NFNLGRP_CONNTRACK_NEW - 1))
        try:
            started = time.monotonic()
            tcp_failed = create(namespace, 0, tcp, socket.IPPROTO_TCP)
            tcp_seconds = time.monotonic() - started
            listener_events, _ = drain(listener.socket)
            unfiltered_events, unfiltered_overruns = drain(unfiltered)
            icmp_failed = create(namespace, tcp, icmp, socket.IPPROTO_ICMP)
            drain(unfiltered)
            started = time.monotonic()
            reads = listener.read()
            read_seconds = time.monotonic() - started
            started = time.monotonic()
            replacements = mapping_sync.current_corrections(namespace, reads, selection)
            replace_seconds = time.monotonic() - started
        finally:
            listener.close()
            unfiltered.close()
        return {
            "tcp_entries": tcp, "tcp_failed": tcp_failed,
            "tcp_create_seconds": round(tcp_seconds, 3),
            "tcp_events_to_the_listener": listener_events,
            "tcp_events_unfiltered": unfiltered_events,
            "unfiltered_overruns": unfiltered_overruns,
            "icmp_entries": icmp, "icmp_failed": icmp_failed,
            "icmp_reported": len(reads),
            "read_us_per_entry": round(read_seconds / max(len(reads), 1) * 1e6, 1),
            "replacements": len(replacements),
            "replace_us_per_entry": round(replace_seconds / max(len(reads), 1) * 1e6, 1),
            "in_table": common.conntrack_count(namespace),
            "loadavg": round(common.load_average()[0], 2)}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark: what mapping sync costs the primary's daemon (events "
                    "filtered in the kernel, parsing, reading entries back).")
    parser.add_argument("--tcp", type=int, default=200_000,
                        help="TCP entries created (their events must not reach the "
                             "listener)")
    parser.add_argument("--icmp", type=int, default=10_000,
                        help="remapped ping entries created (read and replaced)")
    parser.add_argument("--json", help="append the result here (one JSON line)")
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    print(common.uptime_line(), flush=True)
    with common.kernel_limits_for(arguments.tcp + arguments.icmp, print):
        result = measure(arguments.tcp, arguments.icmp)
    print(json.dumps(result), flush=True)
    if arguments.json:
        with open(arguments.json, "a") as output:
            output.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
