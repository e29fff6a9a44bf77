"""A network-namespace lab: one client, two (or more) keepalived HA routers that SNAT,
one server.

Read `build_lab` top to bottom like a runbook. Everything lives in namespaces named
`<prefix>-...`; the root namespace is never touched (no interface, bridge, address or
rule is added there), so several labs, and whatever else runs on the machine, do not
see each other.

    namespace        device        bridge (in <prefix>-sw)  addresses
    <prefix>-client  eth0          br-int    192.168.100.11-18/24, default via .1
    <prefix>-r1/r2   qr-<tag>-in   br-int    VIP 192.168.100.1/24 on the primary only
                     ha-<tag>-rN   br-ha     169.254.192.1/18 (r1), .2/18 (r2)
                     qg-<tag>-ex   br-ext    VIP 203.0.113.10/24 on the primary only;
                                             SNAT to it for everything leaving qg
    <prefix>-server  eth0          br-ext    203.0.113.100/24

`build_lab(..., nodes=3)` adds r3 (<prefix>-r3, HA address 169.254.192.3, the
lowest priority), as a Neutron router on three L3 agents (max_l3_agents_per_router
is 3 by default); each router's keepalived then lists both others as unicast
peers, and snat-sync gets both as peer addresses (it syncs them by multicast).

A `Variant` adds what else the router carries: a second internal subnet routed
without SNAT (192.168.101.0/24, VIP .1), tenant IPv6 routed without NAT
(2001:db8:100::/64 inside, VIP ::1; 2001:db8:203::/64 outside, VIP ::10, server
::100), both VIP sets in keepalived's virtual_ipaddress_excluded as Neutron puts
them; a stateful firewall on both routers (`FIREWALL_RULES`); or IPv6 HA
addresses (fd00:ca5e::1 and ::2/64). The server routes the routed subnets back
through the gateway VIPs, as an upstream router of a no-NAT address scope does.

Every veth pair is created inside the switch namespace with its peer end sent straight
into the node's namespace, so no interface ever exists in the root namespace, not even
for a moment.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
import zlib

import psutil

INTERNAL_VIP = "192.168.100.1"
INTERNAL_PREFIXLEN = 24
CLIENT_ADDRESSES = tuple(f"192.168.100.{host}" for host in range(11, 19))
GATEWAY_ADDRESS = "203.0.113.10"
EXTERNAL_PREFIXLEN = 24
SERVER_ADDRESS = "203.0.113.100"
# r1, r2, r3 in that order; a lab of two routers has the first two.
NODE_HA_ADDRESSES = ("169.254.192.1", "169.254.192.2", "169.254.192.3")
HA_ADDRESSES = NODE_HA_ADDRESSES[:2]
HA_PREFIXLEN = 18
ROUTED_VIP = "192.168.101.1"
ROUTED_NETWORK = "192.168.101.0/24"
ROUTED_CLIENT_ADDRESSES = tuple(f"192.168.101.{host}" for host in range(11, 19))
INTERNAL_VIP6 = "2001:db8:100::1"
INTERNAL_NETWORK6 = "2001:db8:100::/64"
CLIENT_ADDRESSES6 = tuple(f"2001:db8:100::{host}" for host in range(11, 19))
GATEWAY_ADDRESS6 = "2001:db8:203::10"
SERVER_ADDRESS6 = "2001:db8:203::100"
PREFIXLEN6 = 64
NODE_HA_ADDRESSES6 = ("fd00:ca5e::1", "fd00:ca5e::2", "fd00:ca5e::3")
HA_ADDRESSES6 = NODE_HA_ADDRESSES6[:2]
HA_PREFIXLEN6 = 64
# keepalived priorities of r1, r2, r3: r1 wins the first election, r2 takes over
# from it, r3 only when neither is there.
NODE_PRIORITIES = (150, 100, 50)
MAX_NODES = len(NODE_HA_ADDRESSES)
BRIDGES = ("br-int", "br-ha", "br-ext")
INTERFACE_NAME_MAX = 15  # IFNAMSIZ is 16 bytes including the terminating NUL.
PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


class LabError(RuntimeError):
    """A lab step failed; the message names the step and carries the command output."""


@dataclasses.dataclass(frozen=True)
class Leg:
    """One veth pair: `switch_port` is enslaved to `bridge` in the switch namespace,
    `device` is the node's interface."""

    switch_port: str
    device: str
    bridge: str


@dataclasses.dataclass
class Router:
    """One router node. peer_ha_address is the first (with two routers the only)
    peer; peer_ha_addresses, all of them, defaults to just that one."""

    name: str
    namespace: str
    internal: Leg
    ha: Leg
    external: Leg
    ha_address: str
    peer_ha_address: str
    priority: int
    keepalived: subprocess.Popen | None = None
    crashed: bool = False
    # keepalived_config: preempt instead of Neutron's nopreempt, and lines added
    # in global scope and in the vrrp_instance (track_file, say)
    preempt: bool = False
    keepalived_global_lines: tuple = ()
    keepalived_instance_lines: tuple = ()
    peer_ha_addresses: tuple = ()

    def __post_init__(self):
        if not self.peer_ha_addresses:
            self.peer_ha_addresses = (self.peer_ha_address,)
        elif self.peer_ha_addresses[0] != self.peer_ha_address:
            raise ValueError(f"{self.name}: peer_ha_addresses "
                             f"{self.peer_ha_addresses} must start with "
                             f"peer_ha_address {self.peer_ha_address}")

    @property
    def legs(self):
        return (self.internal, self.ha, self.external)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What the lab's router carries besides IPv4 through SNAT (module docstring)."""

    routed_ipv4: bool = False
    ipv6: bool = False
    firewall: bool = False
    ha_ipv6: bool = False


# The tenant's stateful firewall, as an operator writes it for the router's
# forwarded traffic: replies and related ICMP errors of known connections pass,
# invalid packets and new TCP connections that do not start with a SYN are
# dropped, new connections are allowed only from the inside (qr) out (qg).
FIREWALL_TABLE = "tenant_firewall"
FIREWALL_RULES = """table inet {table} {{
	chain forward {{
		type filter hook forward priority filter; policy drop;
		ct state invalid drop
		ct state established,related accept
		tcp flags & (fin|syn|rst|ack) != syn ct state new drop
		iifname "{inside}" oifname "{outside}" ct state new accept
	}}
}}
"""


@dataclasses.dataclass
class Lab:
    prefix: str
    tag: str
    workdir: pathlib.Path
    router_id: str
    vrid: int
    switch_namespace: str
    client_namespace: str
    server_namespace: str
    routers: tuple[Router, ...]  # r1, r2 (, r3)
    namespaces: list[str] = dataclasses.field(default_factory=list)
    processes: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    variant: Variant = Variant()


@dataclasses.dataclass(frozen=True)
class SnatSyncRegistration:
    """What `snat-sync router add --json` answered for one router on one node."""

    state_path: pathlib.Path
    router: str
    namespace: str
    conntrackd_config: pathlib.Path
    notify_command: str


# --- naming -----------------------------------------------------------------------


def new_prefix():
    """A namespace prefix unique enough that parallel labs never collide."""
    return f"ss-{secrets.token_hex(3)}"


def check_interface_name(name):
    if not 0 < len(name.encode()) <= INTERFACE_NAME_MAX:
        raise ValueError(f"interface name {name!r} is longer than 15 bytes")
    return name


def router_legs(tag, router_name):
    """The three legs of one router, named the way Neutron names router ports.

    qr- and qg- ports are the same Neutron port on every node, so both routers use the
    same device names (and, see `port_mac`, the same MAC); the HA port is per node.
    """
    return (
        Leg(f"{router_name}-qr", check_interface_name(f"qr-{tag}-in"), "br-int"),
        Leg(f"{router_name}-ha", check_interface_name(f"ha-{tag}-{router_name}"),
            "br-ha"),
        Leg(f"{router_name}-qg", check_interface_name(f"qg-{tag}-ex"), "br-ext"),
    )


def port_mac(tag, port):
    """A stable MAC in Neutron's fa:16:3e range for the lab's qr (1) or qg (2) port.

    Both routers carry the same MAC on a port, as Neutron's HA routers do: after a
    failover the client's and the server's neighbour entries stay valid, and the
    switch relearns the MAC from the new primary's gratuitous ARP.
    """
    digits = f"{zlib.crc32(tag.encode()) & 0xFFFF:04x}{port:02x}"
    return f"fa:16:3e:{digits[0:2]}:{digits[2:4]}:{digits[4:6]}"


# --- running commands ---------------------------------------------------------------


def run(argv, namespace=None, check=True):
    """Run argv (inside namespace when given) and return the CompletedProcess."""
    if namespace is not None:
        argv = ["ip", "netns", "exec", namespace, *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result


def ip(*args, namespace=None, check=True):
    prefix = ["ip"] if namespace is None else ["ip", "-n", namespace]
    return run([*prefix, *args], check=check)


def package_environment():
    """The environment for Python children: the package is importable even when it is
    not installed, because its source tree goes first on PYTHONPATH."""
    environment = dict(os.environ)
    paths = [str(PACKAGE_ROOT), *filter(None, [environment.get("PYTHONPATH")])]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def python_module(module, *args):
    return [sys.executable, "-m", module, *map(str, args)]


def start_process(lab, namespace, argv, log_path):
    """Start argv inside namespace with stdout and stderr in log_path; the lab keeps
    the Popen so teardown can stop it by pid."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *map(str, argv)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=package_environment(),
            start_new_session=True,
        )
    lab.processes.append(process)
    return process


def wait_until(predicate, timeout, interval=0.05):
    """Poll predicate until it returns something truthy; return that, or None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --- building -----------------------------------------------------------------------


def lab_routers(prefix, tag, ha_addresses=HA_ADDRESSES):
    """The lab's own routers, one per HA address: r1, r2 (, r3) in namespaces
    <prefix>-rN, legs named by tag, priorities NODE_PRIORITIES; each router's
    peers are the others, in order."""
    if not 2 <= len(ha_addresses) <= MAX_NODES:
        raise ValueError(f"the lab has 2 to {MAX_NODES} routers, not "
                         f"{len(ha_addresses)}")
    routers = []
    for index, (address, priority) in enumerate(zip(ha_addresses, NODE_PRIORITIES)):
        name = f"r{index + 1}"
        peers = tuple(peer for peer in ha_addresses if peer != address)
        routers.append(Router(name, f"{prefix}-{name}", *router_legs(tag, name),
                              address, peers[0], priority, peer_ha_addresses=peers))
    return tuple(routers)


def build_lab(workdir, prefix=None, vrid=1, variant=Variant(), routers=None, nodes=2):
    """Build the whole topology; on any failure, tear down what was built and raise.

    routers(prefix, tag) makes the Router objects (their namespaces and device
    names); by default the lab's own (lab_routers): `nodes` of them (2 or 3), on
    IPv6 HA addresses if the variant asks for them.
    """
    prefix = prefix or new_prefix()
    ha_addresses = (NODE_HA_ADDRESSES6 if variant.ha_ipv6
                    else NODE_HA_ADDRESSES)[:nodes]
    tag = prefix.rsplit("-", 1)[-1][:6]  # keeps interface names within 15 bytes
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(
        prefix=prefix,
        tag=tag,
        workdir=workdir,
        router_id=f"router-{tag}",
        vrid=vrid,
        switch_namespace=f"{prefix}-sw",
        client_namespace=f"{prefix}-client",
        server_namespace=f"{prefix}-server",
        routers=(routers(prefix, tag) if routers is not None
                 else lab_routers(prefix, tag, ha_addresses)),
        variant=variant,
    )
    try:
        create_switch(lab)
        create_client(lab)
        create_server(lab)
        for router in lab.routers:
            create_router(lab, router)
    except BaseException:
        teardown(lab)
        raise
    return lab


def create_namespace(lab, namespace):
    """Add a namespace with loopback up and IPv6 off.

    IPv6 is off so that no router solicitation or DAD packet from a backup's qr/qg
    port (which shares its MAC with the primary's) makes the switch learn the MAC on
    the wrong port.
    """
    ip("netns", "add", namespace)
    lab.namespaces.append(namespace)
    if pathlib.Path("/proc/sys/net/ipv6").exists():
        sysctl(
            namespace,
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        )
    ip("link", "set", "lo", "up", namespace=namespace)


def sysctl(namespace, *settings):
    run(["sysctl", "-q", "-w", *settings], namespace=namespace)


def enable_ipv6(namespace, device, shared_mac=False):
    """Turn IPv6 on for one device (create_namespace turned it off everywhere).

    shared_mac (the qr and qg ports both routers share a MAC on): no link-local
    address and no duplicate address detection, so that a backup sends nothing
    from the shared MAC that would make the switch learn it on the wrong port.
    """
    prefix = f"net.ipv6.conf.{device}"
    if shared_mac:
        sysctl(namespace, f"{prefix}.addr_gen_mode=1", f"{prefix}.accept_dad=0")
    sysctl(namespace, f"{prefix}.disable_ipv6=0")


def add_address(namespace, device, address, prefixlen):
    """Add an address; an IPv6 one without duplicate address detection (usable at
    once)."""
    nodad = ("nodad",) if ":" in address else ()
    ip("addr", "add", f"{address}/{prefixlen}", "dev", device, *nodad,
       namespace=namespace)


def create_switch(lab):
    create_namespace(lab, lab.switch_namespace)
    for bridge in BRIDGES:
        # No multicast snooping: the switch floods multicast (neighbour
        # discovery, conntrackd's sync groups) instead of following MLD/IGMP
        # reports that a dead node's port may have sent last.
        ip("link", "add", bridge, "type", "bridge", "mcast_snooping", "0",
           namespace=lab.switch_namespace)
        ip("link", "set", bridge, "up", namespace=lab.switch_namespace)


def add_leg(lab, namespace, leg, mac=None):
    """Create leg's veth pair in the switch, plug one end into its bridge and move the
    other end into namespace."""
    switch = lab.switch_namespace
    ip(
        "link", "add", leg.switch_port, "type", "veth",
        "peer", "name", leg.device, "netns", namespace,
        namespace=switch,
    )
    ip("link", "set", leg.switch_port, "master", leg.bridge, namespace=switch)
    ip("link", "set", leg.switch_port, "up", namespace=switch)
    if mac is not None:
        ip("link", "set", leg.device, "address", mac, namespace=namespace)
    ip("link", "set", leg.device, "up", namespace=namespace)


def create_client(lab):
    namespace = lab.client_namespace
    create_namespace(lab, namespace)
    add_leg(lab, namespace, Leg("client", "eth0", "br-int"))
    for address in CLIENT_ADDRESSES:
        add_address(namespace, "eth0", address, INTERNAL_PREFIXLEN)
    ip("route", "add", "default", "via", INTERNAL_VIP, namespace=namespace)
    # ping sockets (unprivileged ICMP echo, identifier = bound port) for root too
    sysctl(namespace, "net.ipv4.ping_group_range=0 2147483647")
    if lab.variant.routed_ipv4:
        for address in ROUTED_CLIENT_ADDRESSES:
            add_address(namespace, "eth0", address, INTERNAL_PREFIXLEN)
    if lab.variant.ipv6:
        enable_ipv6(namespace, "eth0")
        for address in CLIENT_ADDRESSES6:
            add_address(namespace, "eth0", address, PREFIXLEN6)
        ip("-6", "route", "add", "default", "via", INTERNAL_VIP6, namespace=namespace)


def create_server(lab):
    namespace = lab.server_namespace
    create_namespace(lab, namespace)
    add_leg(lab, namespace, Leg("server", "eth0", "br-ext"))
    add_address(namespace, "eth0", SERVER_ADDRESS, EXTERNAL_PREFIXLEN)
    if lab.variant.routed_ipv4:
        ip("route", "add", ROUTED_NETWORK, "via", GATEWAY_ADDRESS, namespace=namespace)
    if lab.variant.ipv6:
        enable_ipv6(namespace, "eth0")
        add_address(namespace, "eth0", SERVER_ADDRESS6, PREFIXLEN6)
        ip("-6", "route", "add", INTERNAL_NETWORK6, "via", GATEWAY_ADDRESS6,
           namespace=namespace)


def create_router(lab, router):
    """A router namespace as a Neutron L3 agent leaves it before keepalived starts:
    legs up, only the HA address configured, forwarding on, SNAT out of qg.

    The VIPs (and with them the connected routes) appear only when keepalived makes
    this node primary.
    """
    namespace = router.namespace
    create_namespace(lab, namespace)
    add_leg(lab, namespace, router.internal, mac=port_mac(lab.tag, 1))
    add_leg(lab, namespace, router.ha)
    add_leg(lab, namespace, router.external, mac=port_mac(lab.tag, 2))
    variant = lab.variant
    if variant.ha_ipv6:
        enable_ipv6(namespace, router.ha.device)
        add_address(namespace, router.ha.device, router.ha_address, HA_PREFIXLEN6)
    else:
        add_address(namespace, router.ha.device, router.ha_address, HA_PREFIXLEN)
    sysctl(namespace, "net.ipv4.ip_forward=1")
    if variant.routed_ipv4:
        # The routed subnet leaves untranslated: an exemption ahead of the SNAT
        # rule, as Neutron's rule for a no-NAT address scope is.
        run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", ROUTED_NETWORK,
             "-o", router.external.device, "-j", "ACCEPT"], namespace=namespace)
    run(
        [
            "iptables", "-t", "nat", "-A", "POSTROUTING",
            "-o", router.external.device, "-j", "SNAT", "--to-source", GATEWAY_ADDRESS,
        ],
        namespace=namespace,
    )
    if variant.ipv6:
        for leg in (router.internal, router.external):
            enable_ipv6(namespace, leg.device, shared_mac=True)
        sysctl(namespace, "net.ipv6.conf.all.forwarding=1")
    if variant.firewall:
        apply_firewall(lab, router)


def firewall_rules(router):
    return FIREWALL_RULES.format(table=FIREWALL_TABLE, inside=router.internal.device,
                                 outside=router.external.device)


def apply_firewall(lab, router):
    """Load the tenant firewall (FIREWALL_RULES) into the router's namespace."""
    path = lab.workdir / f"firewall-{router.name}.nft"
    path.write_text(firewall_rules(router))
    run(["nft", "-f", str(path)], namespace=router.namespace)


# --- keepalived -----------------------------------------------------------------------


def keepalived_config(lab, router, notify_command=None, advert_int=1):
    """keepalived.conf for one router: one VRRP instance on the HA leg, unicast to the
    peers, the two VIPs on qr and qg.

    All nodes start as BACKUP with nopreempt, as Neutron does; r1's higher priority
    makes it win the first election, and a recovered node never takes the VIPs back.
    With router.preempt, a returning node of higher priority does take them back;
    router.keepalived_global_lines and keepalived_instance_lines go in as given.
    """
    lines = [
        "global_defs {",
        "    enable_script_security",
        "    script_user root",
        f"    router_id {lab.prefix}-{router.name}",
        "}",
        *router.keepalived_global_lines,
        f"vrrp_instance VR_{lab.vrid} {{",
        "    state BACKUP",
        *(() if router.preempt else ("    nopreempt",)),
        f"    interface {router.ha.device}",
        f"    virtual_router_id {lab.vrid}",
        f"    priority {router.priority}",
        f"    advert_int {advert_int}",
        f"    unicast_src_ip {router.ha_address}",
        "    unicast_peer {",
        *(f"        {peer}" for peer in router.peer_ha_addresses),
        "    }",
        "    virtual_ipaddress {",
        f"        {INTERNAL_VIP}/{INTERNAL_PREFIXLEN} dev {router.internal.device}",
        f"        {GATEWAY_ADDRESS}/{EXTERNAL_PREFIXLEN} dev {router.external.device}",
        "    }",
        *excluded_addresses(lab, router),
    ]
    if notify_command is not None:
        if '"' in notify_command:
            raise ValueError(f"notify command {notify_command!r} has a double quote")
        lines.append(f'    notify "{notify_command}"')
    lines.extend(router.keepalived_instance_lines)
    lines.append("}")
    return "\n".join(lines) + "\n"


def excluded_addresses(lab, router):
    """The variant's VIPs in virtual_ipaddress_excluded (Neutron puts all but one
    address there): lines of keepalived.conf, none without a variant."""
    variant = lab.variant
    addresses = []
    if variant.routed_ipv4:
        addresses.append(
            f"{ROUTED_VIP}/{INTERNAL_PREFIXLEN} dev {router.internal.device}")
    if variant.ipv6:
        addresses += [f"{INTERNAL_VIP6}/{PREFIXLEN6} dev {router.internal.device}",
                      f"{GATEWAY_ADDRESS6}/{PREFIXLEN6} dev {router.external.device}"]
        # The ports' link-local addresses are VIPs too, as Neutron has them: the
        # kernel sends neighbour solicitations only from a link-local address,
        # and only the primary may have one.
        addresses += [(f"{link_local(port_mac(lab.tag, port))}/64 dev {leg.device} "
                       "scope link")
                      for port, leg in ((1, router.internal), (2, router.external))]
    if not addresses:
        return []
    return ["    virtual_ipaddress_excluded {",
            *(f"        {address}" for address in addresses),
            "    }"]


def link_local(mac):
    """The EUI-64 link-local IPv6 address of a MAC."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    words = [octets[0] << 8 | octets[1], octets[2] << 8 | 0xFF,
             0xFE << 8 | octets[3], octets[4] << 8 | octets[5]]
    return "fe80::" + ":".join(f"{word:x}" for word in words)


def keepalived_directory(lab, router):
    directory = lab.workdir / f"keepalived-{router.name}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def start_keepalived(lab, router, notify_command=None, advert_int=1):
    """Start keepalived (VRRP only, in the foreground) inside the router namespace.

    Its own config, pid files and log live in the lab's workdir, so it shares nothing
    with a system keepalived or with another lab.
    """
    directory = keepalived_directory(lab, router)
    config = directory / "keepalived.conf"
    config.write_text(keepalived_config(lab, router, notify_command, advert_int))
    router.keepalived = start_process(
        lab,
        router.namespace,
        [
            "keepalived", "--vrrp", "--dont-fork", "--log-console", "--log-detail",
            "--no-syslog",
            "--use-file", config,
            "--pid", directory / "keepalived.pid",
            "--vrrp_pid", directory / "vrrp.pid",
            "--checkers_pid", directory / "checkers.pid",
        ],
        directory / "keepalived.log",
    )
    return router.keepalived


def has_vip(router):
    """Whether keepalived has put the internal VIP on this router's qr leg."""
    result = ip(
        "-o", "-4", "addr", "show", "dev", router.internal.device,
        namespace=router.namespace, check=False,
    )
    return f" {INTERNAL_VIP}/" in result.stdout


def primary(lab):
    """The one live router holding the VIP, or None.

    A crashed router keeps its addresses (nobody removed them), but it is off the
    wire, so it does not count.
    """
    holders = [
        router for router in lab.routers if not router.crashed and has_vip(router)
    ]
    return holders[0] if len(holders) == 1 else None


def wait_for_primary(lab, router, timeout=15):
    """Wait until router alone holds the VIP; raise LabError with the logs otherwise."""
    if not wait_until(lambda: primary(lab) is router, timeout):
        logs = {
            other.name: read_tail(keepalived_directory(lab, other) / "keepalived.log")
            for other in lab.routers
        }
        raise LabError(
            f"{router.name} did not become primary within {timeout}s: {logs}"
        )


def read_tail(path, limit=3000):
    try:
        return pathlib.Path(path).read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# --- snat-sync through its CLI ----------------------------------------------------


# What the lab gives snat-sync as its config when a caller gives none: the metrics
# port 0 (an ephemeral one), so that no daemon of the lab binds the node's port 9787.
SANDBOX_CONFIG = (
    "# Written by the snat-sync lab: keeps the host's config out of the lab's runs.\n"
    "[metrics]\n"
    "listen_port = 0\n"
)


def sandbox_config(state_path):
    """(config file, config directory) of the lab's sandbox for one state path.

    Both sit beside the state path, never inside it, so the state path holds only
    what snat-sync wrote. The directory stays empty: `--config-dir` given on the
    command line keeps oslo.config from reading its default directories
    (/etc/snat-sync/snat-sync.conf.d, ~/.snat-sync/...), as `--config-file` keeps it
    from reading /etc/snat-sync/snat-sync.conf and ~/.snat-sync/snat-sync.conf.
    """
    state_path = pathlib.Path(state_path)
    config = state_path.parent / f"{state_path.name}.sandbox.conf"
    directory = state_path.parent / f"{state_path.name}.sandbox.conf.d"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    if not config.exists():
        config.write_text(SANDBOX_CONFIG)
        config.chmod(0o600)
    directory.mkdir(mode=0o700, exist_ok=True)
    return config, directory


def sandbox_arguments(state_path, arguments=()):
    """The global arguments that keep one snat-sync run off the host's config:
    `--config-file` (the sandbox's) unless arguments give one, and `--config-dir`
    (the sandbox's empty one) unless arguments give one."""
    given = {str(argument).split("=", 1)[0] for argument in arguments}
    config, directory = sandbox_config(state_path)
    extra = []
    if "--config-file" not in given:
        extra += ["--config-file", config]
    if "--config-dir" not in given:
        extra += ["--config-dir", directory]
    return extra


def snat_sync_argv(state_path, *args):
    """`python3 -m snat_sync [sandbox] --state-path STATE ARGS...` as a list."""
    return python_module("snat_sync", *sandbox_arguments(state_path, args),
                         "--state-path", state_path, *args)


def snat_sync(state_path, *args, check=True):
    """Run `python3 -m snat_sync --state-path STATE ARGS...` and return the result.

    Unless args name their own, the run gets the lab's sandbox config file and
    config directory (see sandbox_config): never the host's.
    """
    return run(snat_sync_argv(state_path, *args), check=check)


def snat_sync_router_add(lab, router, state_path, *global_arguments):
    """Register `router`'s node with snat-sync, which starts conntrackd inside it.

    global_arguments (such as --config-file PATH) go before the command.
    """
    result = snat_sync(
        state_path,
        *global_arguments,
        "router", "add", lab.router_id,
        "--namespace", router.namespace,
        "--ha-interface", router.ha.device,
        "--local-address", router.ha_address,
        *(argument for peer in router.peer_ha_addresses
          for argument in ("--peer-address", peer)),
        "--vrid", lab.vrid,
        "--json",
    )
    answer = json.loads(result.stdout)
    return SnatSyncRegistration(
        state_path=pathlib.Path(state_path),
        router=answer["router"],
        namespace=answer["namespace"],
        conntrackd_config=pathlib.Path(answer["conntrackd_config"]),
        notify_command=answer["notify_command"],
    )


def snat_sync_status(state_path, router_id):
    return json.loads(snat_sync(state_path, "status", router_id, "--json").stdout)


# --- connection tracking -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SnatEntry:
    """A connection from a client through the gateway's SNAT, as conntrack lists it:
    original client:port -> server:port, reply server:port -> gateway:public_port."""

    protocol: str
    client_address: str
    client_port: int
    public_port: int
    server_address: str = SERVER_ADDRESS
    server_port: int = 9000

    def insert_arguments(self, timeout=300):
        """`conntrack -I` arguments that create this entry as an established flow.

        --src-nat makes it a real source-NAT entry, the way the SNAT rule would have
        made it. Spelling out the reply tuple instead would list the same, but carry
        no NAT binding, and conntrackd would replicate it as a plain entry.
        """
        arguments = [
            "conntrack", "-I", "-p", self.protocol,
            "-s", self.client_address, "-d", self.server_address,
            "--sport", self.client_port, "--dport", self.server_port,
            "--src-nat", f"{GATEWAY_ADDRESS}:{self.public_port}",
            "-u", "SEEN_REPLY,ASSURED", "-t", timeout,
        ]
        if self.protocol == "tcp":
            arguments += ["--state", "ESTABLISHED"]
        return [str(argument) for argument in arguments]

    def matches(self, line):
        """Whether one line of `conntrack -L` is this entry, public port included."""
        original, reply = conntrack_tuples(line)
        return self.matches_original(line) and reply == {
            "src": self.server_address, "dst": GATEWAY_ADDRESS,
            "sport": str(self.server_port), "dport": str(self.public_port),
        }

    def matches_original(self, line):
        """Whether one listing line has this entry's original tuple.

        conntrackd's cache dumps (-i, -e) print only the original tuple of a
        replicated entry: the NAT mapping travels as attributes that it does not
        show, so the public port can only be checked once the entry is committed.
        """
        original, _ = conntrack_tuples(line)
        return line.split()[:1] == [self.protocol] and original == {
            "src": self.client_address, "dst": self.server_address,
            "sport": str(self.client_port), "dport": str(self.server_port),
        }


def conntrack_tuples(line):
    """The original and reply tuples of one conntrack listing line, as two dicts.

    Each key (src, dst, sport, dport) appears twice on a line: first for the
    original direction, then for the reply.
    """
    original, reply = {}, {}
    for token in line.split():
        key, separator, value = token.partition("=")
        if separator and key in ("src", "dst", "sport", "dport"):
            (reply if key in original else original)[key] = value
    return original, reply


def insert_entry(router, entry):
    run(entry.insert_arguments(), namespace=router.namespace)


def conntrackd_cache(router, conntrackd_config, cache="external"):
    """Lines of conntrackd's internal (-i) or external (-e) cache dump."""
    option = {"internal": "-i", "external": "-e"}[cache]
    argv = ["conntrackd", "-C", str(conntrackd_config), option]
    return run(argv, namespace=router.namespace).stdout.splitlines()


def commit_external_cache(router, conntrackd_config):
    """What a new primary does first: `conntrackd -c`, the external cache into the
    kernel table."""
    run(["conntrackd", "-C", str(conntrackd_config), "-c"], namespace=router.namespace)


def kernel_entries(router):
    return run(["conntrack", "-L"], namespace=router.namespace).stdout.splitlines()


def kernel_entry_count(router):
    """How many entries the router namespace's kernel table holds (`conntrack -C`)."""
    return int(run(["conntrack", "-C"], namespace=router.namespace).stdout.split()[0])


# Idle SNAT entries: clients 10.200.0.1-200 talking to remote hosts 198.51.100.1...
# on port 443, each mapped to its own public port of the gateway address. Their
# reply tuples (remote -> gateway:public port) name remote hosts the live flows
# never talk to, so no idle entry can take a tuple or a public port a live flow
# needs, and their original tuples use other client addresses.
IDLE_CLIENTS = 200
IDLE_CLIENT_NETWORK = "10.200.0.0/24"
IDLE_REMOTE_PORT = 443
IDLE_PUBLIC_PORTS = range(45000, 65000)  # per remote host; the live flows use 40001+
IDLE_TIMEOUT = 3600


def idle_entry(index):
    """The index-th idle entry as one `conntrack -R` line (conntrack's own options).

    Even indexes are established TCP connections, odd ones UDP flows; --src-nat
    gives each a real SNAT binding, as the router's SNAT rule would have.
    """
    remote, port = divmod(index, len(IDLE_PUBLIC_PORTS))
    public_port = IDLE_PUBLIC_PORTS[port]
    protocol = "udp" if index % 2 else "tcp"
    line = (
        f"-I -p {protocol} -t {IDLE_TIMEOUT} -u SEEN_REPLY,ASSURED "
        f"-s 10.200.0.{1 + index % IDLE_CLIENTS} "
        f"-d 198.51.{100 + remote // 254}.{1 + remote % 254} "
        f"--sport {public_port} --dport {IDLE_REMOTE_PORT} "
        f"--src-nat {GATEWAY_ADDRESS}:{public_port}"
    )
    return line + (" --state ESTABLISHED" if protocol == "tcp" else "")


def load_idle_entries(router, count, workdir):
    """Load `count` idle SNAT entries into router's kernel table in one go.

    Writes them to a file and loads it with `conntrack -R` (about 190,000 entries a
    second). Returns how many idle entries the table gained: fewer than count if
    nf_conntrack_max (or a clash) stopped some. Only idle entries are counted: a
    conntrackd restarted meanwhile (a transition) adds its sync socket's entry.
    """
    if count <= 0:
        return 0
    path = write_idle_entries(router, count, workdir)
    before = idle_entry_count(router)
    load_entry_file(router, path)
    return idle_entry_count(router) - before


def write_idle_entries(router, count, workdir):
    """The file of `count` idle SNAT entries for router, as `conntrack -R` reads it."""
    path = pathlib.Path(workdir) / f"idle-entries-{router.name}.txt"
    path.write_text("".join(idle_entry(index) + "\n" for index in range(count)))
    return path


def load_entry_file(router, path):
    run(["conntrack", "-R", str(path)], namespace=router.namespace, check=False)


def idle_entry_count(router):
    """How many idle entries (see idle_entry) the router's kernel table holds."""
    listed = run(["conntrack", "-L", "-s", IDLE_CLIENT_NETWORK],
                 namespace=router.namespace).stdout
    return sum(1 for line in listed.splitlines() if line[:1].isalpha())


# --- processes in a namespace ---------------------------------------------------------


def namespace_identity(namespace):
    """(device, inode) of a named network namespace, as /proc/<pid>/ns/net shows it."""
    status = os.stat(f"/run/netns/{namespace}")
    return (status.st_dev, status.st_ino)


def processes_in_namespace(namespace):
    """Every process whose network namespace is `namespace`."""
    try:
        identity = namespace_identity(namespace)
    except FileNotFoundError:
        return []
    found = []
    for process in psutil.process_iter():
        try:
            status = os.stat(f"/proc/{process.pid}/ns/net")
        except OSError:
            continue
        if (status.st_dev, status.st_ino) == identity:
            found.append(process)
    return found


def named_processes_in_namespace(namespace, name):
    """Processes called `name` (e.g. "conntrackd") inside namespace."""
    found = []
    for process in processes_in_namespace(namespace):
        with contextlib.suppress(psutil.Error):
            if process.name() == name:
                found.append(process)
    return found


def kill_processes(processes, timeout=5):
    """SIGKILL each process by pid and wait until each is gone or a zombie.

    Daemons started by snat-sync are not our children: their parent is whatever
    reaps orphans here, which may take its time, and a zombie already holds no
    namespace, socket or file.
    """
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_until(lambda: not any(map(is_running, processes)), timeout, interval=0.01)


def is_running(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- failures -------------------------------------------------------------------------


def crash_router(lab, router):
    """Make router's node die the hard way, as a power cut would.

    keepalived and conntrackd in its namespace are frozen first (SIGSTOP), so that
    none of them reacts to what follows: no VRRP priority-0 advert, no FAULT
    transition, no conntrackd goodbye. Then the node's switch ports go down, and the
    frozen processes get SIGKILL. The peer learns of the death only from missing
    adverts, after about 3 x advert_int.
    """
    victims = [
        process
        for name in ("keepalived", "conntrackd")
        for process in named_processes_in_namespace(router.namespace, name)
    ]
    for process in victims:
        with contextlib.suppress(psutil.Error):
            process.suspend()
    for leg in router.legs:
        ip("link", "set", leg.switch_port, "down", namespace=lab.switch_namespace)
    router.crashed = True
    kill_processes(victims)
    if router.keepalived is not None:
        router.keepalived.wait(timeout=5)


# --- teardown -------------------------------------------------------------------------


def stop_process(process, timeout=3):
    """SIGTERM, then SIGKILL if it is still there after timeout; reap it."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=timeout)


def teardown(lab):
    """Stop every process the lab started, kill whatever else still runs in its
    namespaces (conntrackd started by snat-sync, notify hooks), delete the namespaces.

    Safe to call twice and on a half-built lab.
    """
    for process in reversed(lab.processes):
        stop_process(process)
    for namespace in lab.namespaces:
        kill_processes(processes_in_namespace(namespace))
    for namespace in reversed(lab.namespaces):
        ip("netns", "delete", namespace, check=False)
    lab.namespaces.clear()
    lab.processes.clear()


@contextlib.contextmanager
def running_lab(workdir, prefix=None, vrid=1, variant=Variant(), routers=None,
                nodes=2):
    """build_lab as a context manager: the lab is torn down however the block ends."""
    lab = build_lab(workdir, prefix=prefix, vrid=vrid, variant=variant,
                    routers=routers, nodes=nodes)
    try:
        yield lab
    finally:
        teardown(lab)

