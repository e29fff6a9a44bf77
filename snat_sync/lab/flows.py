"""Long-lived TCP and UDP test flows through the lab's SNAT router, and their verdicts.

    python3 -m snat_sync.lab.flows server --address 203.0.113.100 --duration 20 \
        --output server.json
    python3 -m snat_sync.lab.flows client --server 203.0.113.100 --duration 14 \
        --output client.json

Each client flow sends a small numbered message every 50-100 ms and the server echoes
it, adding the public address:port it saw the message come from. The client records
when replies arrive; the server records, per flow, every public endpoint it saw.
`merge_reports` joins the two into one `FlowResult` per flow.

Flows share source ports across client addresses on purpose (flow k uses client
address k mod 8 and port base + k div 8): the SNAT router can keep the port for only
one of the addresses and must remap the others, which is exactly the mapping a new
primary does not know unless the connection table was replicated.

ICMP flows are ping sessions: a ping socket bound to the flow's port, which the
kernel makes the echo identifier, so flows of different client addresses share
an identifier and the SNAT router must remap all but one. The server's kernel
answers the echoes; the server program records each request's source address and
identifier (the public endpoint of a ping) from a raw socket (--icmp).

Server addresses may be IPv4 or IPv6 (--address takes several, comma-separated);
a client runs its flows against one server address. A UDP flow records the ICMP
errors that reach its socket (errors_received), and `icmp-error` sends one: a
port unreachable quoting a datagram the router sent for a flow, as the server's
kernel would send if that port closed.

Both programs stop by themselves after --duration seconds, or earlier on SIGTERM
or SIGINT (and report what they saw until then). With --snapshot FILE each also
rewrites FILE every second with what it has seen so far (the client: per flow its
error, replies and last reply; the server: per flow its public endpoints), so that
a long run (the soak, lab/soak.py) can judge the flows after every fault without
waiting for the end.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pathlib
import random
import signal
import socket
import struct
import sys
import time

DEFAULT_PORT = 9000
DEFAULT_BASE_PORT = 40001
DEFAULT_ADDRESSES = tuple(f"192.168.100.{host}" for host in range(11, 19))
ALIVE_WINDOW = 1.0  # a flow is alive when a reply arrived in the run's last second
SEND_INTERVAL = (0.05, 0.1)


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    flow_id: str
    protocol: str
    client_address: str
    client_port: int  # an ICMP flow's echo identifier


@dataclasses.dataclass
class ClientFlowReport:
    """What the client saw of one flow; times are seconds since the run started."""

    flow_id: str
    protocol: str
    client_endpoint: str
    sent: int
    replies: int
    alive: bool
    longest_gap_ms: float
    longest_gap_start: float
    last_reply_at: float | None
    error: str | None
    echoed_public_endpoints: list[str]
    # Every reply's arrival, to the millisecond: what the flow did before a fault.
    reply_times: list[float] = dataclasses.field(default_factory=list)
    # ICMP errors that reached a UDP flow's socket: [seconds, error name]
    errors_received: list[list] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServerFlowReport:
    """What the server saw of one flow: the public endpoints in order of first sight."""

    flow_id: str
    protocol: str
    messages: int
    public_endpoints: list[str]


@dataclasses.dataclass(frozen=True)
class FlowResult:
    flow_id: str
    protocol: str
    client_endpoint: str
    alive: bool
    longest_gap_ms: float
    longest_gap_start: float
    public_endpoints: tuple[str, ...]
    error: str | None
    reply_times: tuple[float, ...] = ()
    errors_received: tuple[tuple[float, str], ...] = ()

    def errors_after(self, moment):
        """The names of the ICMP errors that reached the flow after `moment`."""
        return [name for at, name in self.errors_received if at > moment]

    @property
    def same_public_endpoint(self):
        """The server saw this flow from one public address:port only."""
        return len(self.public_endpoints) == 1

    def replies_before(self, moment):
        """How many replies arrived before `moment` (seconds since the run started)."""
        return sum(1 for at in self.reply_times if at < moment)

    def last_reply_before(self, moment):
        """When the last reply before `moment` arrived, or None if none did."""
        return max((at for at in self.reply_times if at < moment), default=None)

    def was_alive_at(self, moment, window=ALIVE_WINDOW):
        """Whether the flow worked up to `moment`: a reply within `window` before it.

        A negative control ("this setup loses flows") proves something only about
        flows that were alive when the fault came.
        """
        last = self.last_reply_before(moment)
        return last is not None and last >= moment - window


@dataclasses.dataclass(frozen=True)
class TrafficSummary:
    tcp_total: int
    tcp_alive: int
    udp_total: int
    udp_alive: int
    udp_alive_same_endpoint: int
    all_same_endpoint: bool
    tcp_longest_gap_ms: float
    udp_longest_gap_ms: float


# --- pure helpers ---------------------------------------------------------------------


def plan_flows(addresses, tcp_flows, udp_flows, base_port=DEFAULT_BASE_PORT,
               icmp_flows=0, flow_prefix=""):
    """Flow k of each protocol uses addresses[k % n] and port (ICMP: identifier)
    base_port + k // n; flow ids are flow_prefix + protocol-kk."""
    addresses = tuple(addresses)
    plan = []
    for protocol, count in (("tcp", tcp_flows), ("udp", udp_flows),
                            ("icmp", icmp_flows)):
        for index in range(count):
            plan.append(
                FlowSpec(
                    flow_id=f"{flow_prefix}{protocol}-{index:02d}",
                    protocol=protocol,
                    client_address=addresses[index % len(addresses)],
                    client_port=base_port + index // len(addresses),
                )
            )
    return plan


def endpoint(address, port):
    return f"{address}:{port}"


def encode_message(flow_id, sequence):
    return f"{flow_id} {sequence}".encode()


def encode_reply(message, public_endpoint):
    return message.strip() + b" " + public_endpoint.encode()


def decode_reply(data):
    """(flow_id, sequence, public_endpoint) of one echoed message."""
    flow_id, sequence, public_endpoint = data.decode().split()
    return flow_id, int(sequence), public_endpoint


def longest_gap(start, reply_times, end):
    """(length, start) of the longest stretch in [start, end] without a reply."""
    marks = [start, *reply_times, end]
    length, gap_start = max(
        ((later - earlier, earlier) for earlier, later in zip(marks, marks[1:])),
        default=(0.0, start),
    )
    return length, gap_start


def is_alive(reply_times, end, error):
    return error is None and bool(reply_times) and reply_times[-1] >= end - ALIVE_WINDOW


def merge_reports(client_report, server_report):
    """One FlowResult per client flow, with the endpoints the server saw for it."""
    seen = {flow["flow_id"]: flow for flow in server_report.get("flows", [])}
    results = []
    for flow in client_report["flows"]:
        server_flow = seen.get(flow["flow_id"], {})
        results.append(
            FlowResult(
                flow_id=flow["flow_id"],
                protocol=flow["protocol"],
                client_endpoint=flow["client_endpoint"],
                alive=flow["alive"],
                longest_gap_ms=flow["longest_gap_ms"],
                longest_gap_start=flow["longest_gap_start"],
                public_endpoints=tuple(server_flow.get("public_endpoints", ())),
                error=flow["error"],
                reply_times=tuple(flow.get("reply_times", ())),
                errors_received=tuple(
                    (at, name) for at, name in flow.get("errors_received", ())),
            )
        )
    return results


def summarize(results):
    """Counts per protocol; the longest gaps are those of flows still alive at the end
    (a dead flow's gap only says how long the run went on after it died)."""
    tcp = [result for result in results if result.protocol == "tcp"]
    udp = [result for result in results if result.protocol == "udp"]
    return TrafficSummary(
        tcp_total=len(tcp),
        tcp_alive=sum(result.alive for result in tcp),
        udp_total=len(udp),
        udp_alive=sum(result.alive for result in udp),
        udp_alive_same_endpoint=sum(
            result.alive and result.same_public_endpoint for result in udp
        ),
        all_same_endpoint=all(result.same_public_endpoint for result in results),
        tcp_longest_gap_ms=longest_alive_gap(tcp),
        udp_longest_gap_ms=longest_alive_gap(udp),
    )


def longest_alive_gap(results):
    gaps = [result.longest_gap_ms for result in results if result.alive]
    return max(gaps, default=0.0)


# --- server ---------------------------------------------------------------------------


class ServerRecord:
    """Per-flow sightings collected by the server."""

    def __init__(self):
        self.flows = {}

    def saw(self, flow_id, protocol, public_endpoint):
        flow = self.flows.setdefault(
            flow_id, ServerFlowReport(flow_id, protocol, 0, [])
        )
        flow.messages += 1
        if public_endpoint not in flow.public_endpoints:
            flow.public_endpoints.append(public_endpoint)

    def report(self):
        return {"flows": [dataclasses.asdict(flow) for flow in self.flows.values()]}


class EchoDatagram(asyncio.DatagramProtocol):
    def __init__(self, record):
        self.record = record
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, address):
        public_endpoint = endpoint(*address[:2])
        with contextlib.suppress(ValueError):
            flow_id, _ = data.decode().split()
            self.record.saw(flow_id, "udp", public_endpoint)
            self.transport.sendto(encode_reply(data, public_endpoint), address)


async def echo_stream(record, connections, reader, writer):
    public_endpoint = endpoint(*writer.get_extra_info("peername")[:2])
    connections.add(writer)
    with contextlib.suppress(ConnectionError, OSError, ValueError):
        while line := await reader.readline():
            flow_id, _ = line.decode().split()
            record.saw(flow_id, "tcp", public_endpoint)
            writer.write(encode_reply(line, public_endpoint) + b"\n")
            await writer.drain()
    connections.discard(writer)
    writer.close()


ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMP_UNREACHABLE = 3
ICMP_PORT_UNREACHABLE = 3


def echo_request_sighting(packet):
    """(flow_id, public endpoint) of an IPv4 packet carrying an ICMP echo request
    sent by a ping flow, else None; the endpoint is source address:identifier."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header_length = (packet[0] & 0x0F) * 4
    icmp = packet[header_length:]
    if len(icmp) < 8 or icmp[0] != ICMP_ECHO_REQUEST:
        return None
    identifier = struct.unpack("!H", icmp[4:6])[0]
    try:
        flow_id, _ = icmp[8:].decode().split()
    except ValueError:
        return None
    return flow_id, endpoint(socket.inet_ntoa(packet[12:16]), identifier)


def watch_echo_requests(loop, record):
    """Record every ping flow's echo requests (a raw ICMP socket sees a copy of
    each; the kernel still answers them). Returns the socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)

    def readable():
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                sighting = echo_request_sighting(sock.recv(65535))
                if sighting is not None:
                    record.saw(sighting[0], "icmp", sighting[1])

    loop.add_reader(sock.fileno(), readable)
    return sock


async def serve(addresses, port, duration, ready_file, icmp=False, snapshot=None):
    """Echo on every address for `duration` seconds, or until SIGTERM or SIGINT;
    return the report. icmp: also record ping flows' echo requests; snapshot: a
    file rewritten every second with the report so far."""
    record = ServerRecord()
    stop = asyncio.Event()
    connections = set()
    loop = asyncio.get_running_loop()
    servers, transports = [], []
    for address in addresses:
        servers.append(await asyncio.start_server(
            lambda reader, writer: echo_stream(record, connections, reader, writer),
            address,
            port,
            reuse_address=True,
        ))
        transport, _ = await loop.create_datagram_endpoint(
            lambda: EchoDatagram(record), local_addr=(address, port)
        )
        transports.append(transport)
    icmp_socket = watch_echo_requests(loop, record) if icmp else None
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    snapshots = None
    if snapshot:
        snapshots = asyncio.ensure_future(keep_snapshot(snapshot, record.report))
    if ready_file:
        pathlib.Path(ready_file).write_text("ready\n")
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), duration)
    if snapshots is not None:
        snapshots.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await snapshots
    if icmp_socket is not None:
        loop.remove_reader(icmp_socket.fileno())
        icmp_socket.close()
    for transport in transports:
        transport.close()
    for server in servers:
        server.close()
    for writer in list(connections):
        writer.transport.abort()
    await asyncio.sleep(0.1)  # let each handler see its EOF and finish on its own
    return record.report()


# --- client ---------------------------------------------------------------------------


class FlowClock:
    """Reply times of one flow, relative to the run's start."""

    def __init__(self, spec, started):
        self.spec = spec
        self.started = started
        self.sent = 0
        self.reply_times = []
        self.public_endpoints = []
        self.error = None
        self.errors_received = []
        self.stop = None  # an asyncio.Event: set, the flow ends before its deadline

    @property
    def stopped(self):
        return self.stop is not None and self.stop.is_set()

    def now(self):
        return time.monotonic() - self.started

    def replied(self, data):
        with contextlib.suppress(ValueError):
            flow_id, _, public_endpoint = decode_reply(data)
            if flow_id == self.spec.flow_id:
                self.reply_times.append(self.now())
                if public_endpoint not in self.public_endpoints:
                    self.public_endpoints.append(public_endpoint)

    def echoed(self, payload):
        """An echo reply's payload: a reply if it is this flow's (the server does
        not add the public endpoint to a ping's reply)."""
        with contextlib.suppress(ValueError):
            flow_id, _ = payload.decode().split()
            if flow_id == self.spec.flow_id:
                self.reply_times.append(self.now())

    def snapshot(self):
        """What a long run needs to judge the flow now: small, whatever its age."""
        return {
            "flow_id": self.spec.flow_id,
            "protocol": self.spec.protocol,
            "error": self.error,
            "replies": len(self.reply_times),
            "last_reply_at": round(self.reply_times[-1], 3) if self.reply_times
            else None,
            "echoed_public_endpoints": list(self.public_endpoints),
        }

    def report(self, end):
        gap, gap_start = longest_gap(0.0, self.reply_times, end)
        return ClientFlowReport(
            flow_id=self.spec.flow_id,
            protocol=self.spec.protocol,
            client_endpoint=endpoint(self.spec.client_address, self.spec.client_port),
            sent=self.sent,
            replies=len(self.reply_times),
            alive=is_alive(self.reply_times, end, self.error),
            longest_gap_ms=round(gap * 1000, 1),
            longest_gap_start=round(gap_start, 3),
            last_reply_at=round(self.reply_times[-1], 3) if self.reply_times else None,
            error=self.error,
            echoed_public_endpoints=self.public_endpoints,
            reply_times=[round(at, 3) for at in self.reply_times],
            errors_received=[[round(at, 3), name] for at, name in self.errors_received],
        )


def address_family(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def bound_socket(kind, spec, protocol=0):
    sock = socket.socket(address_family(spec.client_address), kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((spec.client_address, spec.client_port))
    sock.setblocking(False)
    return sock


async def pace(clock, deadline, send):
    """Call send(message) every 50-100 ms until the deadline, the client is stopped
    or the flow fails."""
    while clock.error is None and clock.now() < deadline and not clock.stopped:
        await send(encode_message(clock.spec.flow_id, clock.sent))
        clock.sent += 1
        await asyncio.sleep(random.uniform(*SEND_INTERVAL))


async def run_tcp_flow(clock, server, deadline):
    """A TCP flow is dead for good at its first reset, EOF or socket error."""
    loop = asyncio.get_running_loop()
    sock = bound_socket(socket.SOCK_STREAM, clock.spec)
    writer = None
    try:
        await asyncio.wait_for(loop.sock_connect(sock, server), timeout=5)
        reader, writer = await asyncio.open_connection(sock=sock)

        async def send(message):
            writer.write(message + b"\n")
            await writer.drain()

        async def receive():
            try:
                while line := await reader.readline():
                    clock.replied(line)
                clock.error = "eof"
            except (ConnectionError, OSError) as error:
                clock.error = type(error).__name__

        receiver = asyncio.ensure_future(receive())
        try:
            await pace(clock, deadline, send)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
    except (ConnectionError, OSError, asyncio.TimeoutError) as error:
        clock.error = type(error).__name__
    finally:
        if writer is not None:
            writer.transport.abort()
        sock.close()


class ReplyDatagram(asyncio.DatagramProtocol):
    def __init__(self, clock):
        self.clock = clock

    def datagram_received(self, data, address):
        self.clock.replied(data)

    def error_received(self, error):
        """ICMP errors do not end a UDP flow; they are recorded."""
        self.clock.errors_received.append((self.clock.now(), type(error).__name__))


async def run_udp_flow(clock, server, deadline):
    loop = asyncio.get_running_loop()
    sock = bound_socket(socket.SOCK_DGRAM, clock.spec)
    sock.connect(server)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ReplyDatagram(clock), sock=sock
    )

    async def send(message):
        transport.sendto(message)

    try:
        await pace(clock, deadline, send)
    finally:
        transport.close()


async def run_icmp_flow(clock, server, deadline):
    """A ping session: echo requests with the flow's identifier, replies counted.

    The kernel fills in the identifier (the socket's bound port) and the checksum.
    """
    loop = asyncio.get_running_loop()
    sock = bound_socket(socket.SOCK_DGRAM, clock.spec, socket.IPPROTO_ICMP)

    def readable():
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            while True:
                reply = sock.recv(65535)
                if reply[:1] == bytes([ICMP_ECHO_REPLY]):
                    clock.echoed(reply[8:])

    async def send(message):
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, 0, clock.sent & 0xFFFF)
        with contextlib.suppress(OSError):  # no route while the router fails over
            sock.sendto(header + message, (server[0], 0))

    loop.add_reader(sock.fileno(), readable)
    try:
        await pace(clock, deadline, send)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


def checksum(data):
    """The Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def port_unreachable(source, source_port, destination, destination_port):
    """An ICMP port unreachable quoting a UDP datagram source:port -> destination:
    port (IPv4), without its outer IP header (the kernel adds it)."""
    quoted_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64,
                                socket.IPPROTO_UDP, 0, socket.inet_aton(source),
                                socket.inet_aton(destination))
    quoted_header = (quoted_header[:10] + struct.pack("!H", checksum(quoted_header))
                     + quoted_header[12:])
    quoted = quoted_header + struct.pack("!HHHH", source_port, destination_port, 8, 0)
    message = struct.pack("!BBHI", ICMP_UNREACHABLE, ICMP_PORT_UNREACHABLE, 0, 0) + quoted
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def send_port_unreachable(source, source_port, destination, destination_port):
    """Send port_unreachable(...) to `source`, the address the datagram came from."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.sendto(port_unreachable(source, source_port, destination,
                                     destination_port), (source, 0))


async def bounded(flow, clock, duration):
    """Run one flow, but never past duration plus a grace period (a write that blocks
    on a stalled connection must not keep the client alive)."""
    try:
        await asyncio.wait_for(flow, duration + 5)
    except asyncio.TimeoutError:
        clock.error = clock.error or "timeout"


SNAPSHOT_INTERVAL = 1.0


def write_atomically(path, data):
    """Write data as JSON to path through a temporary file: a reader never sees a
    half-written snapshot."""
    path = pathlib.Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


async def keep_snapshot(path, take):
    """Write take() to path every SNAPSHOT_INTERVAL until cancelled, then once more."""
    try:
        while True:
            write_atomically(path, take())
            await asyncio.sleep(SNAPSHOT_INTERVAL)
    finally:
        write_atomically(path, take())


def client_snapshot(clocks, started):
    return {
        "started_at": time.time() - (time.monotonic() - started),
        "now": round(time.monotonic() - started, 3),
        "flows": [clock.snapshot() for clock in clocks],
    }


async def run_flows(server_address, server_port, specs, duration, snapshot=None):
    """Run every flow for duration seconds, or until SIGTERM or SIGINT; the report."""
    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    clocks = [FlowClock(spec, started) for spec in specs]
    for clock in clocks:
        clock.stop = stop
    server = (server_address, server_port)
    runners = {"tcp": run_tcp_flow, "udp": run_udp_flow, "icmp": run_icmp_flow}
    snapshots = None
    if snapshot:
        snapshots = asyncio.ensure_future(
            keep_snapshot(snapshot, lambda: client_snapshot(clocks, started)))
    await asyncio.gather(
        *(
            bounded(runners[clock.spec.protocol](clock, server, duration), clock,
                    duration)
            for clock in clocks
        )
    )
    if snapshots is not None:
        snapshots.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await snapshots
    end = min(time.monotonic() - started, duration)
    return {
        "started_at": time.time() - (time.monotonic() - started),
        "duration": duration,
        "flows": [dataclasses.asdict(clock.report(end)) for clock in clocks],
    }


# --- command line ---------------------------------------------------------------------


def write_report(report, output):
    text = json.dumps(report, indent=2) + "\n"
    if output:
        pathlib.Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="python3 -m snat_sync.lab.flows", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser(
        "server", help="echo server that records the public endpoints it sees"
    )
    server.add_argument("--address", required=True,
                        help="the address to serve on, or several, comma-separated")
    server.add_argument("--icmp", action="store_true",
                        help="record ping flows' echo requests (raw socket)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT)
    server.add_argument("--duration", type=float, required=True)
    server.add_argument("--ready-file", help="written once both sockets listen")
    server.add_argument("--output", help="JSON report file (default: stdout)")
    server.add_argument("--snapshot", help="a file rewritten every second with the "
                        "report so far")
    client = commands.add_parser("client", help="long-lived flows with a report")
    client.add_argument("--server", required=True)
    client.add_argument("--port", type=int, default=DEFAULT_PORT)
    client.add_argument("--addresses", default=",".join(DEFAULT_ADDRESSES))
    client.add_argument("--tcp-flows", type=int, default=16)
    client.add_argument("--udp-flows", type=int, default=16)
    client.add_argument("--icmp-flows", type=int, default=0)
    client.add_argument("--flow-prefix", default="",
                        help="put before every flow id (keeps clients apart)")
    client.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    client.add_argument("--duration", type=float, required=True)
    client.add_argument("--output", help="JSON report file (default: stdout)")
    client.add_argument("--snapshot", help="a file rewritten every second with each "
                        "flow's error, replies and last reply so far")
    icmp_error = commands.add_parser(
        "icmp-error", help="send a port unreachable about a UDP datagram (IPv4)")
    icmp_error.add_argument("--quoted-source", required=True,
                            help="ADDRESS:PORT the datagram came from (gets the error)")
    icmp_error.add_argument("--quoted-destination", required=True,
                            help="ADDRESS:PORT the datagram went to")
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    if arguments.command == "icmp-error":
        source, source_port = arguments.quoted_source.rsplit(":", 1)
        destination, destination_port = arguments.quoted_destination.rsplit(":", 1)
        send_port_unreachable(source, int(source_port), destination,
                              int(destination_port))
        return 0
    if arguments.command == "server":
        report = asyncio.run(serve(
            arguments.address.split(","), arguments.port, arguments.duration,
            arguments.ready_file, arguments.icmp, arguments.snapshot,
        ))
    else:
        specs = plan_flows(
            arguments.addresses.split(","),
            arguments.tcp_flows,
            arguments.udp_flows,
            arguments.base_port,
            arguments.icmp_flows,
            arguments.flow_prefix,
        )
        report = asyncio.run(
            run_flows(arguments.server, arguments.port, specs, arguments.duration,
                      arguments.snapshot)
        )
    write_report(report, arguments.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
