"""The kinds-of-connection scenario: one crash of the primary while the router
carries every kind at once, with or without snat-sync.

The lab is the dual-stack variant (topology.Variant): the tenant firewall on both
routers, and through it
    snat     IPv4 TCP, UDP and ping sessions through SNAT (clients .100.11-18)
    routed   IPv4 TCP and UDP routed without SNAT (clients .101.11-18)
    ipv6     IPv6 TCP and UDP routed without NAT (clients 2001:db8:100::11-18)
Each kind has its own flow client (flow ids start with the kind); one server
serves both families and records the ping sessions' identifiers. A second after
r2 has taken over, the server sends a port unreachable about one SNAT'd UDP flow
that r1 had remapped, quoting the datagram as r1 translated it: it reaches the
client only if the new primary relates it to that flow's entry, NAT mapping and
all.
"""

import dataclasses
import json
import pathlib
import time

from snat_sync.lab import demo
from snat_sync.lab import flows
from snat_sync.lab import nodes
from snat_sync.lab import topology as lab_module

VARIANT = lab_module.Variant(routed_ipv4=True, ipv6=True, firewall=True)
SERVER_PORT = flows.DEFAULT_PORT


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    addresses: tuple
    server: str
    icmp: bool = False


KINDS = (
    Kind("snat", lab_module.CLIENT_ADDRESSES, lab_module.SERVER_ADDRESS, icmp=True),
    Kind("routed", lab_module.ROUTED_CLIENT_ADDRESSES, lab_module.SERVER_ADDRESS),
    Kind("ipv6", lab_module.CLIENT_ADDRESSES6, lab_module.SERVER_ADDRESS6),
)


@dataclasses.dataclass(frozen=True)
class KindsSettings:
    flows: int = 8  # per protocol and kind
    # r2's IPv6 entries are watched from when r1 holds every IPv6 flow until
    # the crash, this long: over 4 s, [failover] refresh_interval's default, so a
    # refresh tick flips every live flow's mark in between.
    refresh_window: float = 4.5
    # the longest the flows may take to start (the clients' run includes it)
    start_timeout: float = 3.0
    run_after_crash: float = 9.0
    advert_int: int = 1
    snat_sync_arguments: tuple = ()
    icmp_error_after: float = 1.0  # seconds after r2 took over

    @property
    def client_duration(self):
        """Long enough for the slowest start, the window and the run after."""
        return self.start_timeout + self.refresh_window + self.run_after_crash


@dataclasses.dataclass(frozen=True)
class KindRun:
    """One kind's flows; times in seconds since that kind's client started."""

    kind: str
    flows: tuple
    failure_at: float
    icmp_error_at: float | None

    def of(self, protocol):
        return [flow for flow in self.flows if flow.protocol == protocol]


@dataclasses.dataclass(frozen=True)
class KindsResult:
    with_snat_sync: bool
    runs: dict
    failover_seconds: float
    # The SNAT'd UDP flow the port unreachable was about, and its public port.
    icmp_error_flow: str
    icmp_error_public_port: int
    # Entries of each family in r2's kernel table just before the crash.
    backup_entries: dict
    # The connection marks r2's IPv6 entries had in the refresh window
    # ({original tuple: marks seen}).
    backup_ipv6_marks: dict = dataclasses.field(default_factory=dict)

    def refreshed_ipv6_entries(self):
        """r2's IPv6 entries whose mark a refresh flipped in the window."""
        return [key for key, marks in self.backup_ipv6_marks.items()
                if len(marks) > 1]

    def run(self, kind):
        return self.runs[kind]


def start_client(lab, workdir, kind, settings):
    return lab_module.start_process(
        lab, lab.client_namespace,
        lab_module.python_module(
            "snat_sync.lab.flows", "client",
            "--server", kind.server, "--port", SERVER_PORT,
            "--addresses", ",".join(kind.addresses),
            "--tcp-flows", settings.flows, "--udp-flows", settings.flows,
            "--icmp-flows", settings.flows if kind.icmp else 0,
            "--flow-prefix", f"{kind.name}-",
            "--duration", settings.client_duration,
            "--output", workdir / f"client-{kind.name}.json",
        ),
        workdir / f"client-{kind.name}.log",
    )


def start_server(lab, workdir, duration):
    ready = workdir / "server.ready"
    server = lab_module.start_process(
        lab, lab.server_namespace,
        lab_module.python_module(
            "snat_sync.lab.flows", "server",
            "--address", f"{lab_module.SERVER_ADDRESS},{lab_module.SERVER_ADDRESS6}",
            "--port", SERVER_PORT, "--icmp", "--duration", duration,
            "--ready-file", ready, "--output", workdir / "server.json",
        ),
        workdir / "server.log",
    )
    if not lab_module.wait_until(ready.exists, timeout=10):
        raise lab_module.LabError(
            f"flow server did not start: {lab_module.read_tail(workdir / 'server.log')}")
    return server


def remapped_udp_flow(router, settings):
    """(flow id, public port) of the first SNAT'd UDP flow that the router's SNAT
    gave another port than its own, from the router's kernel table."""
    kind = KINDS[0]
    for spec in flows.plan_flows(kind.addresses, 0, settings.flows,
                                 flow_prefix=f"{kind.name}-"):
        listing = lab_module.run(
            ["conntrack", "-L", "-p", "udp", "-s", spec.client_address,
             "--sport", str(spec.client_port)],
            namespace=router.namespace, check=False).stdout
        for line in listing.splitlines():
            _, reply = lab_module.conntrack_tuples(line)
            if reply.get("dport") and int(reply["dport"]) != spec.client_port:
                return spec.flow_id, int(reply["dport"])
    raise lab_module.LabError(f"no remapped UDP flow in {router.name}'s table")


def entries_by_family(router):
    return {family: len([line for line in lab_module.run(
        ["conntrack", "-L", "-f", family], namespace=router.namespace,
        check=False).stdout.splitlines() if line[:1].isalpha()])
        for family in ("ipv4", "ipv6")}


def ipv6_marks(router):
    """{(protocol, src, dst, sport, dport): connection mark} of the router's IPv6
    entries."""
    marks = {}
    for line in lab_module.run(["conntrack", "-L", "-f", "ipv6"],
                               namespace=router.namespace,
                               check=False).stdout.splitlines():
        original, _ = lab_module.conntrack_tuples(line)
        mark = next((token.split("=", 1)[1] for token in line.split()
                     if token.startswith("mark=")), None)
        if line[:1].isalpha() and mark is not None:
            marks[(line.split()[0], *(original.get(key) for key in
                                      ("src", "dst", "sport", "dport")))] = mark
    return marks


def send_port_unreachable(lab, public_port):
    """From the server: a port unreachable about the datagram the gateway sent
    from public_port to the server's flow port."""
    lab_module.run(lab_module.python_module(
        "snat_sync.lab.flows", "icmp-error",
        "--quoted-source", f"{lab_module.GATEWAY_ADDRESS}:{public_port}",
        "--quoted-destination", f"{lab_module.SERVER_ADDRESS}:{SERVER_PORT}"),
        namespace=lab.server_namespace)


def run_scenario(workdir, with_snat_sync, settings=KindsSettings()):
    """Build the lab, run every kind's flows through one crash of r1, tear down."""
    workdir = pathlib.Path(workdir)
    with lab_module.running_lab(workdir, variant=VARIANT) as lab:
        demo.start_routers(lab, workdir, with_snat_sync, settings)
        if with_snat_sync:
            # As on a production node: the daemon sends the primary's translated
            # ICMP identifiers and SCTP ports, which conntrackd does not carry.
            nodes.start_daemons(lab, {router.name: demo.node_state_path(workdir, router)
                                      for router in lab.routers})
        server = start_server(lab, workdir, settings.client_duration + 10)
        clients = {kind.name: start_client(lab, workdir, kind, settings)
                   for kind in KINDS}
        r1, r2 = lab.routers
        ipv6_flows = 2 * settings.flows
        if not lab_module.wait_until(lambda: len(ipv6_marks(r1)) >= ipv6_flows,
                                     settings.start_timeout, interval=0.1):
            raise lab_module.LabError(f"r1 does not hold {ipv6_flows} IPv6 flows")
        marks_seen = {}
        window_ends = time.monotonic() + settings.refresh_window
        while time.monotonic() < window_ends:
            for key, mark in ipv6_marks(r2).items():
                marks_seen.setdefault(key, set()).add(mark)
            time.sleep(0.25)
        target_flow, public_port = remapped_udp_flow(r1, settings)
        backup_entries = entries_by_family(r2)
        failed_at = time.time()
        failover_seconds = demo.crash_primary(lab)
        time.sleep(settings.icmp_error_after)
        icmp_error_sent_at = time.time()
        send_port_unreachable(lab, public_port)
        for name, client in clients.items():
            demo.wait_for_exit(client, workdir / f"client-{name}.log",
                               settings.client_duration + 20)
        demo.stop_server(server, workdir / "server.log")
    server_report = json.loads((workdir / "server.json").read_text())
    runs = {}
    for kind in KINDS:
        report = json.loads((workdir / f"client-{kind.name}.json").read_text())
        runs[kind.name] = KindRun(
            kind=kind.name,
            flows=tuple(flows.merge_reports(report, server_report)),
            failure_at=failed_at - report["started_at"],
            icmp_error_at=icmp_error_sent_at - report["started_at"],
        )
    return KindsResult(with_snat_sync, runs, failover_seconds, target_flow,
                       public_port, backup_entries,
                       {key: tuple(sorted(marks)) for key, marks in marks_seen.items()})


def count(flows_, protocol, predicate):
    """(flows of protocol that satisfy predicate, flows of protocol)."""
    chosen = [flow for flow in flows_ if flow.protocol == protocol]
    return sum(1 for flow in chosen if predicate(flow)), len(chosen)


def kept(flow):
    """Alive at the end, seen by the server from one public endpoint (for a ping
    session: one source address and identifier) the whole time."""
    return flow.alive and flow.same_public_endpoint


def summary_lines(result):
    """Per kind and protocol: flows kept of flows, as the README quotes them."""
    lines = []
    for name, run in result.runs.items():
        for protocol in ("tcp", "udp", "icmp"):
            survived, total = count(run.flows, protocol, kept)
            if total:
                lines.append(f"{name} {protocol}: {survived}/{total}")
    target = next(flow for flow in result.runs["snat"].flows
                  if flow.flow_id == result.icmp_error_flow)
    delivered = bool(target.errors_after(result.runs["snat"].failure_at))
    lines.append(f"port unreachable after failover delivered: {delivered}")
    return lines
