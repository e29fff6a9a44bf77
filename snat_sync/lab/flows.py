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

Both programs stop by themselves after --duration seconds.
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
    client_port: int


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


def plan_flows(addresses, tcp_flows, udp_flows, base_port=DEFAULT_BASE_PORT):
    """Flow k of each protocol uses addresses[k % n] and port base_port + k // n."""
    addresses = tuple(addresses)
    plan = []
    for protocol, count in (("tcp", tcp_flows), ("udp", udp_flows)):
        for index in range(count):
            plan.append(
                FlowSpec(
                    flow_id=f"{protocol}-{index:02d}",
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


async def serve(address, port, duration, ready_file):
    """Echo for `duration` seconds, or until SIGTERM or SIGINT; return the report."""
    record = ServerRecord()
    stop = asyncio.Event()
    connections = set()
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(
        lambda reader, writer: echo_stream(record, connections, reader, writer),
        address,
        port,
        reuse_address=True,
    )
    transport, _ = await loop.create_datagram_endpoint(
        lambda: EchoDatagram(record), local_addr=(address, port)
    )
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    if ready_file:
        pathlib.Path(ready_file).write_text("ready\n")
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), duration)
    transport.close()
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

    def now(self):
        return time.monotonic() - self.started

    def replied(self, data):
        with contextlib.suppress(ValueError):
            flow_id, _, public_endpoint = decode_reply(data)
            if flow_id == self.spec.flow_id:
                self.reply_times.append(self.now())
                if public_endpoint not in self.public_endpoints:
                    self.public_endpoints.append(public_endpoint)

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
        )


def bound_socket(kind, spec):
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((spec.client_address, spec.client_port))
    sock.setblocking(False)
    return sock


async def pace(clock, deadline, send):
    """Call send(message) every 50-100 ms until the deadline or the flow fails."""
    while clock.error is None and clock.now() < deadline:
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
        """ICMP errors (port unreachable during a failover) do not end a UDP flow."""


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


async def bounded(flow, clock, duration):
    """Run one flow, but never past duration plus a grace period (a write that blocks
    on a stalled connection must not keep the client alive)."""
    try:
        await asyncio.wait_for(flow, duration + 5)
    except asyncio.TimeoutError:
        clock.error = clock.error or "timeout"


async def run_flows(server_address, server_port, specs, duration):
    started = time.monotonic()
    clocks = [FlowClock(spec, started) for spec in specs]
    server = (server_address, server_port)
    runners = {"tcp": run_tcp_flow, "udp": run_udp_flow}
    await asyncio.gather(
        *(
            bounded(runners[clock.spec.protocol](clock, server, duration), clock,
                    duration)
            for clock in clocks
        )
    )
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
    server.add_argument("--address", required=True)
    server.add_argument("--port", type=int, default=DEFAULT_PORT)
    server.add_argument("--duration", type=float, required=True)
    server.add_argument("--ready-file", help="written once both sockets listen")
    server.add_argument("--output", help="JSON report file (default: stdout)")
    client = commands.add_parser("client", help="long-lived flows with a report")
    client.add_argument("--server", required=True)
    client.add_argument("--port", type=int, default=DEFAULT_PORT)
    client.add_argument("--addresses", default=",".join(DEFAULT_ADDRESSES))
    client.add_argument("--tcp-flows", type=int, default=16)
    client.add_argument("--udp-flows", type=int, default=16)
    client.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    client.add_argument("--duration", type=float, required=True)
    client.add_argument("--output", help="JSON report file (default: stdout)")
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    if arguments.command == "server":
        report = asyncio.run(serve(
            arguments.address, arguments.port, arguments.duration, arguments.ready_file
        ))
    else:
        specs = plan_flows(
            arguments.addresses.split(","),
            arguments.tcp_flows,
            arguments.udp_flows,
            arguments.base_port,
        )
        report = asyncio.run(
            run_flows(arguments.server, arguments.port, specs, arguments.duration)
        )
    write_report(report, arguments.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
