"""Whole nodes of the lab: a router namespace with its own `snat-sync daemon`, state
path and configuration, and the ways such a node leaves the network and returns.

A node here is what a machine of an HA router pair holds: keepalived and conntrackd
in the router namespace, the node daemon in the root namespace (it enters the
router namespace by name). `die_keeping_table` stops all of them at once and takes
the node off the wire, but leaves the namespace and its kernel conntrack table as
they were, so that `return_node` brings the node back with the table it had: the
rolling restart of a node whose table outlived its processes. With flush=True the
return is a reboot's: the table comes back empty.

Every daemon is started in its own session and kept in lab.processes, so
`topology.teardown` stops it by pid however a test ends; `kill_daemon` kills its
whole process group (the daemon and the commands it runs) by that pid.
"""

import concurrent.futures
import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess

from snat_sync.lab import demo
from snat_sync.lab import topology

# Every daemon the lab starts binds its metrics endpoint to a free port, never the
# default 127.0.0.1:9787 that a real node's daemon may hold.
METRICS_SECTION = "[metrics]\nlisten_port = 0\n"


def write_config(path, resync_on_backup=True, extra=""):
    """A node's snat-sync configuration file (mode 0600, as the daemon wants)."""
    path = pathlib.Path(path)
    path.write_text(
        "[failover]\n"
        f"resync_on_backup = {str(resync_on_backup).lower()}\n"
        + METRICS_SECTION + extra)
    path.chmod(0o600)
    return path


@dataclasses.dataclass
class Node:
    router: topology.Router
    state_path: pathlib.Path
    config: pathlib.Path | None  # None: the lab's sandbox config
    daemon_log: pathlib.Path
    notify_command: str = ""
    daemon: subprocess.Popen | None = None

    @property
    def name(self):
        return self.router.name

    @property
    def global_arguments(self):
        return ("--config-file", str(self.config)) if self.config else ()


def add_node(lab, router, state_path, config):
    """`snat-sync router add` on router's node with its configuration file."""
    registration = topology.snat_sync_router_add(
        lab, router, state_path, "--config-file", str(config))
    return Node(router, pathlib.Path(state_path), pathlib.Path(config),
                lab.workdir / f"daemon-{router.name}.log",
                registration.notify_command)


def start_daemon(lab, node, workers=2):
    """`snat-sync daemon` for node, in its own session; kept in lab.processes."""
    with open(node.daemon_log, "ab") as log:
        node.daemon = subprocess.Popen(
            topology.snat_sync_argv(node.state_path, *node.global_arguments,
                                    "daemon", "--workers", workers),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=topology.package_environment(), start_new_session=True)
    lab.processes.append(node.daemon)
    return node.daemon


def start_daemons(lab, state_paths, config=None):
    """`snat-sync daemon` beside each router that `router add` registered with
    state_paths ({router name: path}) and config (None: the sandbox's); returns
    the Nodes once each daemon has a socket in its router's namespace (its first
    reconciliation has opened the router's sockets: the peer channel always,
    the table and mapping listeners where they run)."""
    started = [Node(router, pathlib.Path(state_paths[router.name]), config,
                    lab.workdir / f"daemon-{router.name}.log")
               for router in lab.routers]
    for node in started:
        start_daemon(lab, node)
    for node in started:
        owner = f"pid={node.daemon.pid},"
        if not topology.wait_until(
                lambda: owner in topology.run(
                    ["ss", "-Hlntup"], namespace=node.router.namespace).stdout,
                timeout=20, interval=0.2):
            raise topology.LabError(f"the daemon of {node.name} opened no socket "
                                    f"in {node.router.namespace} in 20 s (see "
                                    f"{node.daemon_log})")
    return started


def signal_daemon(node, signal_number):
    """Send signal_number to node's daemon and everything in its session."""
    if node.daemon is None or node.daemon.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.daemon.pid, signal_number)


def kill_daemon(node):
    """SIGKILL node's daemon (and its process group) by pid and reap it."""
    if node.daemon is None:
        return
    signal_daemon(node, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.daemon.wait(timeout=5)


def start_nodes(lab, workdir, configs, advert_int=1):
    """Every router (both of a pair) added with its config ({name: path}), each
    node's daemon running, keepalived on each with the notify hook, r1 primary and
    the others backup with their transitions done. Returns {name: Node}."""
    workdir = pathlib.Path(workdir)
    # One `router add` per node at once: each is a Python start-up and a
    # conntrackd start of its own (some seconds each on a loaded machine), and
    # the nodes share nothing.
    with concurrent.futures.ThreadPoolExecutor(len(lab.routers)) as pool:
        added = list(pool.map(
            lambda router: add_node(lab, router, workdir / router.name,
                                    configs[router.name]), lab.routers))
    nodes = {node.name: node for node in added}
    for node in nodes.values():
        start_daemon(lab, node)
    demo.start_keepalived_pair(
        lab, {name: node.notify_command for name, node in nodes.items()},
        {name: node.state_path for name, node in nodes.items()}, advert_int)
    return nodes


def node_processes(node):
    """keepalived and conntrackd in node's router namespace."""
    return [process
            for name in ("keepalived", "conntrackd")
            for process in topology.named_processes_in_namespace(
                node.router.namespace, name)]


def set_switch_ports(lab, router, state, legs=None):
    for leg in legs or router.legs:
        topology.ip("link", "set", leg.switch_port, state,
                    namespace=lab.switch_namespace)


def die_keeping_table(lab, node, while_frozen=None):
    """The node stops dead but its router namespace, addresses and kernel table
    stay: daemon, keepalived and conntrackd are frozen (nobody reacts to what
    follows), while_frozen() runs if given (e.g. to add an entry that nobody will
    ever replicate), the switch ports go down, and everything frozen is killed."""
    signal_daemon(node, signal.SIGSTOP)
    victims = node_processes(node)
    for process in victims:
        with contextlib.suppress(Exception):
            process.suspend()
    if while_frozen is not None:
        while_frozen()
    set_switch_ports(lab, node.router, "down")
    node.router.crashed = True
    topology.kill_processes(victims)
    kill_daemon(node)
    if node.router.keepalived is not None:
        node.router.keepalived.wait(timeout=5)


def crash_node(lab, node):
    """The node dies as lab.crash_router has it (keepalived and conntrackd frozen,
    ports down, killed), and so does its daemon."""
    signal_daemon(node, signal.SIGSTOP)
    topology.crash_router(lab, node.router)
    kill_daemon(node)


def return_node(lab, node, flush=False, advert_int=1, remove_addresses=True,
                daemon_first=True, timeout=15, priority=None):
    """The node comes back: its table flushed first if flush (a reboot), the
    addresses a killed keepalived left behind removed (a restarted node has none;
    keepalived adds them when it becomes primary), switch ports up, the daemon and
    then keepalived started again. keepalived starts as BACKUP with nopreempt, so
    the peer stays primary.

    priority: keepalived's priority from now on (a rolling restart of three nodes
    returns each with the lowest, so that the next failover goes to a node not
    restarted yet).

    daemon_first: keepalived starts only once the daemon has started conntrackd
    (and restored what its last recorded role needs), as on a node whose init
    starts the daemon before keepalived; otherwise keepalived's BACKUP hook
    usually starts conntrackd first."""
    router = node.router
    if flush:
        topology.run(["conntrack", "-F"], namespace=router.namespace, check=False)
    for address, prefixlen, leg in (
            (topology.INTERNAL_VIP, topology.INTERNAL_PREFIXLEN, router.internal),
            (topology.GATEWAY_ADDRESS, topology.EXTERNAL_PREFIXLEN, router.external),
    )[:2 * remove_addresses]:
        topology.ip("addr", "del", f"{address}/{prefixlen}", "dev", leg.device,
                    namespace=router.namespace, check=False)
    set_switch_ports(lab, router, "up")
    router.crashed = False
    if priority is not None:
        router.priority = priority
    start_daemon(lab, node)
    if daemon_first and not topology.wait_until(
            lambda: topology.named_processes_in_namespace(router.namespace,
                                                          "conntrackd"), timeout):
        raise topology.LabError(
            f"{node.name}'s daemon did not start conntrackd within {timeout} s: "
            + topology.read_tail(node.daemon_log))
    topology.start_keepalived(lab, router, node.notify_command or None, advert_int)


# --- comparing tables -----------------------------------------------------------------


def entry_key(line):
    """One conntrack listing line as protocol, original and reply tuple: what two
    nodes' copies of one connection have in common (timeouts and marks differ)."""
    original, reply = topology.conntrack_tuples(line)
    fields = line.split()
    protocol = fields[0] if fields else ""
    return (protocol, *(original.get(key) for key in ("src", "dst", "sport", "dport")),
            *(reply.get(key) for key in ("src", "dst", "sport", "dport")))


def table_keys(router, *filters):
    """The entry keys of router's kernel table; filters are `conntrack -L` options
    (e.g. "-s", "10.200.0.7") to compare a sample rather than the whole table."""
    result = topology.run(["conntrack", "-L", *filters], namespace=router.namespace,
                          check=False)
    return {entry_key(line) for line in result.stdout.splitlines()
            if line and line[0].isalpha()}
