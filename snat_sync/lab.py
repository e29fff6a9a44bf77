"""A network-namespace lab: one client, two keepalived HA routers that SNAT, one server.

Read `build_lab` top to bottom like a runbook. Everything lives in namespaces named
`<prefix>-...`; the root namespace is never touched (no interface, bridge, address or
rule is added there), so several labs, and whatever else runs on the machine, do not
see each other.

    <prefix>-client  eth0 192.168.100.11-18/24, default via 192.168.100.1
          |
    <prefix>-sw      br-int ---- br-ha ---- br-ext     (three Linux bridges)
          |              |          |          |
    <prefix>-r1/-r2  qr-...     ha-...     qg-...      keepalived moves the VIPs
                     .100.1     169.254.192.1/.2  203.0.113.10, SNAT out of qg
          |
    <prefix>-server  eth0 203.0.113.100/24

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

import psutil

INTERNAL_VIP = "192.168.100.1"
INTERNAL_PREFIXLEN = 24
CLIENT_ADDRESSES = tuple(f"192.168.100.{host}" for host in range(11, 19))
GATEWAY_ADDRESS = "203.0.113.10"
EXTERNAL_PREFIXLEN = 24
SERVER_ADDRESS = "203.0.113.100"
HA_ADDRESSES = ("169.254.192.1", "169.254.192.2")
HA_PREFIXLEN = 18
BRIDGES = ("br-int", "br-ha", "br-ext")
INTERFACE_NAME_MAX = 15  # IFNAMSIZ is 16 bytes including the terminating NUL.
PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent


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
    name: str
    namespace: str
    internal: Leg
    ha: Leg
    external: Leg
    ha_address: str
    peer_ha_address: str
    priority: int
    keepalived: subprocess.Popen | None = None

    @property
    def legs(self):
        return (self.internal, self.ha, self.external)


@dataclasses.dataclass
class Lab:
    prefix: str
    workdir: pathlib.Path
    router_id: str
    vrid: int
    switch_namespace: str
    client_namespace: str
    server_namespace: str
    routers: tuple[Router, Router]
    namespaces: list[str] = dataclasses.field(default_factory=list)
    processes: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def router(self, name):
        return next(router for router in self.routers if router.name == name)


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
        Leg(f"{router_name}-ha", check_interface_name(f"ha-{tag}-{router_name}"), "br-ha"),
        Leg(f"{router_name}-qg", check_interface_name(f"qg-{tag}-ex"), "br-ext"),
    )


def port_mac(tag, port):
    """A stable MAC in Neutron's fa:16:3e range for the lab's qr (1) or qg (2) port.

    Both routers carry the same MAC on a port, as Neutron's HA routers do: after a
    failover the client's and the server's neighbour entries stay valid, and the
    switch relearns the MAC from the new primary's gratuitous ARP.
    """
    digits = f"{int(tag, 16) & 0xFFFF:04x}{port:02x}"
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


def build_lab(workdir, prefix=None, vrid=1):
    """Build the whole topology; on any failure, tear down what was built and raise."""
    prefix = prefix or new_prefix()
    tag = prefix.rsplit("-", 1)[-1][:6]
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    r1_legs = router_legs(tag, "r1")
    r2_legs = router_legs(tag, "r2")
    lab = Lab(
        prefix=prefix,
        workdir=workdir,
        router_id=f"router-{tag}",
        vrid=vrid,
        switch_namespace=f"{prefix}-sw",
        client_namespace=f"{prefix}-client",
        server_namespace=f"{prefix}-server",
        routers=(
            Router("r1", f"{prefix}-r1", *r1_legs, HA_ADDRESSES[0], HA_ADDRESSES[1], 150),
            Router("r2", f"{prefix}-r2", *r2_legs, HA_ADDRESSES[1], HA_ADDRESSES[0], 100),
        ),
    )
    try:
        create_switch(lab)
        create_client(lab)
        create_server(lab)
        for router in lab.routers:
            create_router(lab, router, tag)
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
        run(
            [
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
            namespace=namespace,
        )
    ip("link", "set", "lo", "up", namespace=namespace)


def create_switch(lab):
    create_namespace(lab, lab.switch_namespace)
    for bridge in BRIDGES:
        ip("link", "add", bridge, "type", "bridge", namespace=lab.switch_namespace)
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
        ip("addr", "add", f"{address}/{INTERNAL_PREFIXLEN}", "dev", "eth0", namespace=namespace)
    ip("route", "add", "default", "via", INTERNAL_VIP, namespace=namespace)


def create_server(lab):
    namespace = lab.server_namespace
    create_namespace(lab, namespace)
    add_leg(lab, namespace, Leg("server", "eth0", "br-ext"))
    ip("addr", "add", f"{SERVER_ADDRESS}/{EXTERNAL_PREFIXLEN}", "dev", "eth0", namespace=namespace)


def create_router(lab, router, tag):
    """A router namespace as a Neutron L3 agent leaves it before keepalived starts:
    legs up, only the HA address configured, forwarding on, SNAT out of qg.

    The VIPs (and with them the connected routes) appear only when keepalived makes
    this node primary.
    """
    namespace = router.namespace
    create_namespace(lab, namespace)
    add_leg(lab, namespace, router.internal, mac=port_mac(tag, 1))
    add_leg(lab, namespace, router.ha)
    add_leg(lab, namespace, router.external, mac=port_mac(tag, 2))
    ip("addr", "add", f"{router.ha_address}/{HA_PREFIXLEN}", "dev", router.ha.device, namespace=namespace)
    run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], namespace=namespace)
    run(
        [
            "iptables", "-t", "nat", "-A", "POSTROUTING",
            "-o", router.external.device, "-j", "SNAT", "--to-source", GATEWAY_ADDRESS,
        ],
        namespace=namespace,
    )


# --- keepalived -----------------------------------------------------------------------


def keepalived_config(lab, router, notify_command=None, advert_int=1):
    """keepalived.conf for one router: one VRRP instance on the HA leg, unicast to the
    peer, the two VIPs on qr and qg.

    Both nodes start as BACKUP with nopreempt, as Neutron does; r1's higher priority
    makes it win the first election, and a recovered node never takes the VIPs back.
    """
    lines = [
        "global_defs {",
        "    enable_script_security",
        "    script_user root",
        f"    router_id {lab.prefix}-{router.name}",
        "}",
        f"vrrp_instance VR_{lab.vrid} {{",
        "    state BACKUP",
        "    nopreempt",
        f"    interface {router.ha.device}",
        f"    virtual_router_id {lab.vrid}",
        f"    priority {router.priority}",
        f"    advert_int {advert_int}",
        f"    unicast_src_ip {router.ha_address}",
        "    unicast_peer {",
        f"        {router.peer_ha_address}",
        "    }",
        "    virtual_ipaddress {",
        f"        {INTERNAL_VIP}/{INTERNAL_PREFIXLEN} dev {router.internal.device}",
        f"        {GATEWAY_ADDRESS}/{EXTERNAL_PREFIXLEN} dev {router.external.device}",
        "    }",
    ]
    if notify_command is not None:
        if '"' in notify_command:
            raise ValueError(f"notify command {notify_command!r} contains a double quote")
        lines.append(f'    notify "{notify_command}"')
    lines.append("}")
    return "\n".join(lines) + "\n"


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
    """The router holding the VIP, or None."""
    holders = [router for router in lab.routers if has_vip(router)]
    return holders[0] if len(holders) == 1 else None


def wait_for_primary(lab, router, timeout=15):
    """Wait until router alone holds the VIP; raise LabError with the logs otherwise."""
    if not wait_until(lambda: primary(lab) is router, timeout):
        logs = {
            other.name: read_tail(keepalived_directory(lab, other) / "keepalived.log")
            for other in lab.routers
        }
        raise LabError(f"{router.name} did not become primary within {timeout}s: {logs}")


def read_tail(path, limit=3000):
    try:
        return pathlib.Path(path).read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# --- snat-sync through its CLI ----------------------------------------------------


def snat_sync(state_path, *args, check=True):
    """Run `python3 -m snat_sync --state-path STATE ARGS...` and return the result."""
    return run(python_module("snat_sync", "--state-path", state_path, *args), check=check)


def snat_sync_router_add(lab, router, state_path):
    """Register `router`'s node with snat-sync, which starts conntrackd inside it."""
    result = snat_sync(
        state_path,
        "router", "add", lab.router_id,
        "--namespace", router.namespace,
        "--ha-interface", router.ha.device,
        "--local-address", router.ha_address,
        "--peer-address", router.peer_ha_address,
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
    """SIGKILL each process by pid and wait for them to go."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=timeout)


# --- failures -------------------------------------------------------------------------


def crash_router(lab, router):
    """Make router's node die the hard way: its switch ports go down (the node is off
    the wire) and keepalived and conntrackd in its namespace get SIGKILL, so nothing
    it runs sends a last word (no VRRP priority-0 advert, no conntrackd goodbye)."""
    for leg in router.legs:
        ip("link", "set", leg.switch_port, "down", namespace=lab.switch_namespace)
    victims = [
        process
        for name in ("keepalived", "conntrackd")
        for process in named_processes_in_namespace(router.namespace, name)
    ]
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
def running_lab(workdir, prefix=None, vrid=1):
    """build_lab as a context manager: the lab is torn down however the block ends."""
    lab = build_lab(workdir, prefix=prefix, vrid=vrid)
    try:
        yield lab
    finally:
        teardown(lab)


def ensure_root():
    """Raise LabError unless running as root: namespaces, veth and iptables need it."""
    if os.geteuid() != 0:
        raise LabError(
            "the snat-sync lab creates network namespaces, veth pairs, bridges and "
            "iptables rules: run it as root"
        )

