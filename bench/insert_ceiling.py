"""Benchmark: how fast this kernel creates conntrack entries through ctnetlink.

A bulk send (a node's return, `-B`) ends with the backup's conntrackd creating every
entry in its kernel table, and issue 12's time to redundancy was measured at 5-6x the
link's transfer floor. This asks where the floor of that insertion lies: SNAT'ed UDP
entries of the kind conntrackd injects (both tuples, a timeout, the source NAT
mapping) are created in a fresh namespace by ctnetlink requests prebuilt before the
clock starts, so the time measured is the kernel's:

- `ack`: one request per send, each answer awaited (what conntrackd 1.4.7's
  external_inject.c does, without its parsing and bookkeeping);
- `batch`: --batch requests per send, no answers asked for (errors still come back);
- each with and without the NAT mapping, on one socket and on --workers sockets in
  parallel processes.

    python3 bench/insert_ceiling.py [--entries 200000,1000000] [--batch 256]
                                    [--workers 2] [--json FILE]

Root. Each measurement gets its own namespace `ssb-<hex>-ceiling`, deleted however
the run ends (which frees its entries); the global nf_conntrack_max and hash size are
raised for the largest --entries and restored after.
"""

import argparse
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
IPCTNL_MSG_CT_NEW = 1 << 8 | 0  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_NAT_SRC, CTA_TIMEOUT = 1, 2, 6, 7
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, CTA_NAT_PROTO = 1, 2, 3
CTA_PROTO_NAT_PORT_MIN, CTA_PROTO_NAT_PORT_MAX = 1, 2
UDP = 17
ENTRY_TIMEOUT = 600
PORTS = 60000  # public ports per public address, client ports per client address
CLIENTS = ipaddress.IPv4Address("10.0.0.0")
PUBLIC = ipaddress.IPv4Address("203.0.0.1")
REMOTE = ipaddress.IPv4Address("198.51.100.1")
REMOTE_PORT = 443


def attribute(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nested(kind, *children):
    return attribute(kind | NLA_F_NESTED, b"".join(children))


def tuple_attribute(kind, source, source_port, destination, destination_port):
    return nested(
        kind,
        nested(CTA_TUPLE_IP, attribute(CTA_IP_V4_SRC, source.packed),
               attribute(CTA_IP_V4_DST, destination.packed)),
        nested(CTA_TUPLE_PROTO, attribute(CTA_PROTO_NUM, bytes([UDP])),
               attribute(CTA_PROTO_SRC_PORT, struct.pack("!H", source_port)),
               attribute(CTA_PROTO_DST_PORT, struct.pack("!H", destination_port))))


def create_request(index, nat, flags):
    """IPCTNL_MSG_CT_NEW for entry `index`: client 10.x.y.z:port -> 198.51.100.1:443,
    the reply to public address:port (nat) or to the client itself. Every index has
    its own client tuple and its own public tuple."""
    client = CLIENTS + 1 + index % 250 + 256 * (index // (250 * PORTS))
    client_port = 1024 + index // 250 % PORTS
    public, public_port = PUBLIC + 256 * (index // PORTS), 1024 + index % PORTS
    reply_to = (public, public_port) if nat else (client, client_port)
    body = (tuple_attribute(CTA_TUPLE_ORIG, client, client_port, REMOTE, REMOTE_PORT)
            + tuple_attribute(CTA_TUPLE_REPLY, REMOTE, REMOTE_PORT, *reply_to)
            + attribute(CTA_TIMEOUT, struct.pack("!I", ENTRY_TIMEOUT)))
    if nat:
        port = struct.pack("!H", public_port)
        body += nested(CTA_NAT_SRC, attribute(CTA_NAT_V4_MINIP, public.packed),
                       attribute(CTA_NAT_V4_MAXIP, public.packed),
                       nested(CTA_NAT_PROTO, attribute(CTA_PROTO_NAT_PORT_MIN, port),
                              attribute(CTA_PROTO_NAT_PORT_MAX, port)))
    payload = struct.pack("=BBH", socket.AF_INET, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), IPCTNL_MSG_CT_NEW, flags,
                       index + 1, 0) + payload


def errors_in(data):
    """Failed requests among the netlink messages in data (NLMSG_ERROR, errno != 0)."""
    failed, offset = 0, 0
    while offset + 20 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        failed += kind == NLMSG_ERROR and struct.unpack_from("=i", data, offset + 16)[0] != 0
        offset += max(16, (length + 3) & ~3)
    return failed


def insert(first, entries, batch, nat):
    """Inside the namespace: create entries first..first+entries-1; prints
    'seconds failed'."""
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if batch == 1 else 0)
    requests = [create_request(index, nat, flags) for index in range(first, first + entries)]
    netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    netlink.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    netlink.bind((0, 0))
    failed = 0
    started = time.perf_counter()
    if batch == 1:
        for request in requests:
            netlink.send(request)
            failed += errors_in(netlink.recv(65536))
    else:
        for start in range(0, len(requests), batch):
            netlink.send(b"".join(requests[start:start + batch]))
    seconds = time.perf_counter() - started
    netlink.setblocking(False)
    try:
        while True:
            failed += errors_in(netlink.recv(1 << 20))
    except BlockingIOError:
        pass
    print(f"{seconds:.6f} {failed}", flush=True)


def measure(entries, batch, nat, workers):
    """One measurement in a namespace of its own: entries split over workers."""
    with common.Bench("ceiling") as bench:
        namespace = bench.namespace("ceiling")
        # A nat-table rule makes the namespace register NAT, as a router's has.
        common.sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT",
                  namespace=namespace)
        share = entries // workers
        processes = [bench.start(
            namespace, [sys.executable, os.path.abspath(__file__), "insert",
                        worker * share, share, batch, "nat" if nat else "plain"],
            bench.workdir / f"worker-{worker}.log", stdout=subprocess.PIPE)
            for worker in range(workers)]
        answers = [process.communicate(timeout=600)[0].decode().split()
                   for process in processes]
        if any(len(answer) != 2 for answer in answers):
            logs = [(bench.workdir / f"worker-{worker}.log").read_text()[-2000:]
                    for worker in range(workers)]
            raise RuntimeError(f"a worker printed no result: {answers}; its "
                               f"errors: {logs}")
        seconds = max(float(answer[0]) for answer in answers)
        return {"entries": share * workers, "requests": "ack" if batch == 1 else
                f"batch of {batch}", "nat": nat, "workers": workers,
                "seconds": round(seconds, 3),
                "per_second": round(share * workers / seconds),
                "failed": sum(int(answer[1]) for answer in answers),
                "in_table": common.conntrack_count(namespace),
                "loadavg": round(common.load_average()[0], 2)}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark: how fast this kernel creates conntrack entries "
                    "through ctnetlink (the floor of a backup's bulk insert).")
    parser.add_argument("--entries", type=common.integer_list,
                        default="200000,1000000",
                        help="table sizes to create, comma-separated "
                             "(default 200000,1000000)")
    parser.add_argument("--batch", type=int, default=256,
                        help="requests per send in the batched runs (default 256)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel sockets in the parallel runs (default 2)")
    parser.add_argument("--json", help="write the results to this file")
    arguments = parser.parse_args(argv)
    if arguments.batch < 2:
        parser.error(f"--batch {arguments.batch}: must be at least 2")
    if arguments.workers < 1:
        parser.error(f"--workers {arguments.workers}: must be at least 1")
    if min(arguments.entries) < 1:
        parser.error(f"--entries {min(arguments.entries)}: each size must be at "
                     "least 1")
    return arguments


def main(argv=None):
    arguments = parse_arguments(argv)
    print(common.uptime_line(), flush=True)
    results = []
    with common.kernel_limits_for(max(arguments.entries), print):
        for entries in arguments.entries:
            for batch, nat, workers in ((1, False, 1), (1, True, 1),
                                        (arguments.batch, False, 1),
                                        (arguments.batch, True, 1),
                                        (1, True, arguments.workers),
                                        (arguments.batch, True, arguments.workers)):
                results.append(measure(entries, batch, nat, workers))
                print(json.dumps(results[-1]), flush=True)
    print("\n| entries | requests | NAT mapping | sockets | seconds | entries/s | "
          "in the table | failed | load |\n| --- | --- | --- | --- | --- | --- | --- | "
          "--- | --- |")
    for row in results:
        print(f"| {row['entries']:,} | {row['requests']} | {'yes' if row['nat'] else 'no'}"
              f" | {row['workers']} | {row['seconds']:.3f} s | {row['per_second']:,} | "
              f"{row['in_table']:,} | {row['failed']} | {row['loadavg']} |")
    if arguments.json:
        with open(arguments.json, "w") as output:
            json.dump(results, output, indent=1)
    return 0 if all(row["failed"] == 0 and row["in_table"] == row["entries"]
                    for row in results) else 1


if __name__ == "__main__" and sys.argv[1:2] == ["insert"]:
    insert(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "nat")
elif __name__ == "__main__":
    sys.exit(main())
