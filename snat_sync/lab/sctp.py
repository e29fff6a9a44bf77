"""SCTP associations over raw sockets, for kernels that track SCTP but cannot speak it.

    python3 -m snat_sync.lab.sctp server --address 203.0.113.100 --duration 40 \
        --output server.json
    python3 -m snat_sync.lab.sctp client --server 203.0.113.100 \
        --addresses 192.168.100.16,192.168.100.17 --ready-file R --duration 20 \
        --output client.json

The lab's kernel has SCTP connection tracking (and NAT of SCTP ports) built in but
no SCTP sockets (CONFIG_IP_SCTP off): the endpoints here are written in user space
on raw IP sockets, enough of RFC 9260 for conntrack to see a real association: the
four-way handshake (INIT, INIT ACK, COOKIE ECHO, COOKIE ACK) with verification
tags and CRC32c checksums, then a HEARTBEAT every 50-100 ms that the server
answers with a HEARTBEAT ACK. Every association uses the same client port from
its own address, so SNAT must remap all but one of them, and a router that does
not know the mapping sends the packets from another public port.

The server, like a real SCTP stack, answers only packets from the endpoint (public
address and port) that set the association up and with its verification tag; it
records every endpoint an association's packets came from.
"""

import argparse
import json
import os
import pathlib
import select
import signal
import socket
import struct
import sys
import time

IPPROTO_SCTP = 132
SERVER_PORT = 9900
CLIENT_PORT = 5001
INIT, INIT_ACK, HEARTBEAT, HEARTBEAT_ACK, COOKIE_ECHO, COOKIE_ACK = 1, 2, 4, 5, 10, 11
PARAMETER_HEARTBEAT_INFO = 1
PARAMETER_STATE_COOKIE = 7
HEARTBEAT_INTERVAL = 0.075
ALIVE_WINDOW = 1.0


def _crc32c_table():
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    """CRC32c (Castagnoli), the SCTP checksum: crc32c(b"123456789") == 0xE3069283."""
    value = 0xFFFFFFFF
    for byte in data:
        value = CRC32C_TABLE[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


def chunk(kind, body=b"", flags=0):
    padding = b"\0" * (-len(body) % 4)
    return struct.pack("!BBH", kind, flags, 4 + len(body)) + body + padding


def parameter(kind, value):
    padding = b"\0" * (-len(value) % 4)
    return struct.pack("!HH", kind, 4 + len(value)) + value + padding


def packet(source_port, destination_port, tag, *chunks):
    """An SCTP packet with its checksum (stored little-endian, as RFC 9260 says)."""
    body = b"".join(chunks)
    header = struct.pack("!HHII", source_port, destination_port, tag, 0)
    checksum = crc32c(header + body)
    return header[:8] + struct.pack("<I", checksum) + body


def init_body(tag):
    """INIT and INIT ACK: tag, a_rwnd, outbound and inbound streams, initial TSN."""
    return struct.pack("!IIHHI", tag, 65536, 1, 1, tag)


def parse(datagram):
    """(source address, source port, destination port, tag, [(kind, body)]) of one
    IPv4 datagram as a raw socket receives it, or None if it is not valid SCTP."""
    header_length = (datagram[0] & 0x0F) * 4
    source = socket.inet_ntoa(datagram[12:16])
    data = datagram[header_length:]
    if len(data) < 12:
        return None
    source_port, destination_port, tag = struct.unpack("!HHI", data[:8])
    (checksum,) = struct.unpack("<I", data[8:12])
    if crc32c(data[:8] + b"\0\0\0\0" + data[12:]) != checksum:
        return None
    chunks, offset = [], 12
    while offset + 4 <= len(data):
        kind, _flags, length = struct.unpack("!BBH", data[offset:offset + 4])
        if length < 4:
            break
        chunks.append((kind, data[offset + 4:offset + length]))
        offset += length + (-length % 4)
    return source, source_port, destination_port, tag, chunks


def parameters(data):
    """{kind: value} of a chunk's variable-length parameters."""
    found, offset = {}, 0
    while offset + 4 <= len(data):
        kind, length = struct.unpack("!HH", data[offset:offset + 4])
        if length < 4:
            break
        found[kind] = data[offset + 4:offset + length]
        offset += length + (-length % 4)
    return found


def raw_socket(address):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
    sock.bind((address, 0))
    return sock


def new_tag():
    return int.from_bytes(os.urandom(4), "big") or 1


# --- server ---------------------------------------------------------------------------


def serve(address, duration, output):
    """Serve for duration seconds or until SIGTERM, then write the report."""
    sock = raw_socket(address)
    associations = {}  # server tag -> {"endpoint", "peer_tag", "endpoints", ...}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _serve(sock, associations, time.monotonic() + duration)
    finally:
        report = {"associations": [
            {key: association[key] for key in (
                "endpoint", "endpoints", "heartbeats", "established")}
            for association in associations.values()]}
        pathlib.Path(output).write_text(json.dumps(report, indent=2) + "\n")


def _serve(sock, associations, deadline):
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.2)
        if not ready:
            continue
        parsed = parse(sock.recv(65535))
        if parsed is None:
            continue
        source, source_port, destination_port, tag, chunks = parsed
        if destination_port != SERVER_PORT or not chunks:
            continue
        endpoint = f"{source}:{source_port}"
        kind, body = chunks[0]
        if kind == INIT and tag == 0:
            peer_tag = struct.unpack("!I", body[:4])[0]
            own_tag = new_tag()
            associations[own_tag] = {"endpoint": endpoint, "peer_tag": peer_tag,
                                     "endpoints": [endpoint], "heartbeats": 0,
                                     "established": False}
            cookie = parameter(PARAMETER_STATE_COOKIE, struct.pack("!I", own_tag))
            sock.sendto(packet(SERVER_PORT, source_port, peer_tag,
                               chunk(INIT_ACK, init_body(own_tag) + cookie)),
                        (source, 0))
            continue
        association = associations.get(tag)
        if association is None:
            continue
        if endpoint not in association["endpoints"]:
            association["endpoints"].append(endpoint)
        if endpoint != association["endpoint"]:
            continue  # out of the blue for this association: no answer
        if kind == COOKIE_ECHO:
            association["established"] = True
            sock.sendto(packet(SERVER_PORT, source_port, association["peer_tag"],
                               chunk(COOKIE_ACK)), (source, 0))
        elif kind == HEARTBEAT and association["established"]:
            association["heartbeats"] += 1
            sock.sendto(packet(SERVER_PORT, source_port, association["peer_tag"],
                               chunk(HEARTBEAT_ACK, body)), (source, 0))


# --- client ---------------------------------------------------------------------------


class Association:
    def __init__(self, address, server):
        self.address = address
        self.server = server
        self.own_tag = new_tag()
        self.peer_tag = None
        self.established = False
        self.sent = 0
        self.ack_times = []
        self.sock = raw_socket(address)

    def send(self, tag, *chunks):
        self.sock.sendto(packet(CLIENT_PORT, SERVER_PORT, tag, *chunks),
                         (self.server, 0))

    def start(self):
        self.send(0, chunk(INIT, init_body(self.own_tag)))

    def heartbeat(self):
        info = parameter(PARAMETER_HEARTBEAT_INFO, struct.pack("!Q", self.sent))
        self.send(self.peer_tag, chunk(HEARTBEAT, info))
        self.sent += 1

    def received(self, parsed, now):
        source, source_port, destination_port, tag, chunks = parsed
        if (source, source_port, destination_port) != (
                self.server, SERVER_PORT, CLIENT_PORT) or tag != self.own_tag:
            return
        for kind, body in chunks:
            if kind == INIT_ACK and self.peer_tag is None:
                self.peer_tag = struct.unpack("!I", body[:4])[0]
                cookie = parameters(body[16:]).get(PARAMETER_STATE_COOKIE, b"")
                self.send(self.peer_tag, chunk(COOKIE_ECHO, cookie))
            elif kind == COOKIE_ACK:
                self.established = True
            elif kind == HEARTBEAT_ACK:
                self.ack_times.append(now)

    def report(self, end):
        return {"client_endpoint": f"{self.address}:{CLIENT_PORT}",
                "established": self.established, "heartbeats": self.sent,
                "acks": len(self.ack_times),
                "alive": bool(self.ack_times) and self.ack_times[-1] >= end - ALIVE_WINDOW,
                "ack_times": [round(at, 3) for at in self.ack_times]}


def run_client(server, addresses, ready_file, duration):
    started = time.monotonic()
    associations = [Association(address, server) for address in addresses]
    for association in associations:
        association.start()
    ready_written = False
    next_heartbeat = time.monotonic()
    while (now := time.monotonic() - started) < duration:
        if not ready_written and all(each.established for each in associations):
            pathlib.Path(ready_file).write_text("ready\n")
            ready_written = True
        if time.monotonic() >= next_heartbeat:
            for association in associations:
                if association.established:
                    association.heartbeat()
            next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        sockets = [association.sock for association in associations]
        ready, _, _ = select.select(sockets, [], [], 0.02)
        for association in associations:
            if association.sock in ready:
                parsed = parse(association.sock.recv(65535))
                if parsed is not None:
                    association.received(parsed, time.monotonic() - started)
    end = min(time.monotonic() - started, duration)
    return {"associations": [association.report(end) for association in associations]}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python3 -m snat_sync.lab.sctp",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server")
    server.add_argument("--address", required=True)
    server.add_argument("--duration", type=float, required=True)
    server.add_argument("--output", required=True)
    client = commands.add_parser("client")
    client.add_argument("--server", required=True)
    client.add_argument("--addresses", required=True)
    client.add_argument("--ready-file", required=True)
    client.add_argument("--duration", type=float, required=True)
    client.add_argument("--output", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    if arguments.command == "server":
        serve(arguments.address, arguments.duration, arguments.output)
        return 0
    report = run_client(arguments.server, arguments.addresses.split(","),
                        arguments.ready_file, arguments.duration)
    pathlib.Path(arguments.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
