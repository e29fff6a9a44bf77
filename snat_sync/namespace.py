"""Facts read from a router's network namespace (netlink, /proc): the thin edge,
and how the other edges run a command inside it (command_inside, run_inside).

Nothing here changes the namespace by itself.
"""

import dataclasses
import ipaddress
import os
import pathlib
import re
import subprocess

from snat_sync import roles
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.router import NamespaceFacts

NETNS_RUN_DIR = pathlib.Path("/run/netns")


def namespace_path(namespace):
    return NETNS_RUN_DIR / namespace


def command_inside(namespace, *argv):
    """argv run inside the router's network namespace (nsenter is cheaper than
    ip netns exec)."""
    return ["nsenter", f"--net={namespace_path(namespace)}", *map(str, argv)]


def run_inside(namespace, argv, timeout, error, env=None):
    """Run argv inside the namespace; the CompletedProcess (check returncode
    yourself). error(message), an exception class, if it cannot be run or does
    not finish within timeout seconds."""
    try:
        return subprocess.run(command_inside(namespace, *argv), capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(map(str, argv))} did not finish within {timeout} s "
                    f"in namespace {namespace}") from None
    except OSError as failure:
        raise error(f"cannot run {argv[0]}: {failure}") from None


def namespace_inode(namespace):
    """The inode that identifies the namespace; None if it does not exist."""
    try:
        return namespace_path(namespace).stat().st_ino
    except OSError:
        return None


def process_namespace_inode(pid):
    """The inode of the network namespace process pid lives in; None if unknown."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class HaLink:
    """The router's HA interface in its namespace: its index and the network of
    the router's local address on it."""

    index: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network


def gather_facts(spec):
    """Check that the router's namespace, interface and address exist; learn the rest.

    Raises InvalidInput naming the missing piece.
    """
    ha_network = ha_link(spec).network
    for peer in spec.peer_addresses:
        if peer not in ha_network:
            raise InvalidInput(
                "peer address", str(peer), f"not in the HA network {ha_network}"
            )
    return NamespaceFacts(ha_network, nf_conntrack_max(spec.namespace))


def ha_link(spec):
    """The HA interface's index and network; InvalidInput naming what is missing."""
    from pyroute2 import IPRoute

    if namespace_inode(spec.namespace) is None:
        raise InvalidInput(
            "namespace", spec.namespace, f"no such network namespace in {NETNS_RUN_DIR}"
        )
    with IPRoute(netns=spec.namespace, flags=0) as ipr:
        indexes = ipr.link_lookup(ifname=spec.ha_interface)
        if not indexes:
            raise InvalidInput(
                "HA interface",
                spec.ha_interface,
                f"no such interface in namespace {spec.namespace}",
            )
        interfaces = [
            ipaddress.ip_interface(f"{entry.get('IFA_ADDRESS')}/{entry['prefixlen']}")
            for entry in ipr.get_addr(index=indexes[0])
        ]
    ha_network = next(
        (iface.network for iface in interfaces if iface.ip == spec.local_address), None
    )
    if ha_network is None:
        raise InvalidInput(
            "local address",
            str(spec.local_address),
            f"not configured on {spec.ha_interface} in namespace {spec.namespace} "
            f"(it has {', '.join(str(iface) for iface in interfaces) or 'none'})",
        )
    return HaLink(indexes[0], ha_network)


ADDRESS_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host"}


def addresses(namespace):
    """Every address in the namespace: [(device, address, scope)], scope "global",
    "link", "host" or the number. SnatSyncError if the namespace is missing or
    netlink cannot be read."""
    from pyroute2 import IPRoute

    if namespace_inode(namespace) is None:
        raise SnatSyncError(f"no network namespace {namespace} in {NETNS_RUN_DIR}")
    try:
        with IPRoute(netns=namespace, flags=0) as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME")
                     for link in ipr.get_links()}
            messages = ipr.get_addr()
    except Exception as failure:  # pyroute2 raises a variety of errors
        raise SnatSyncError(f"cannot read the addresses in namespace {namespace}: "
                            f"{failure}") from None
    return [(names.get(message["index"], str(message["index"])),
             message.get_attr("IFA_ADDRESS"),
             ADDRESS_SCOPES.get(message["scope"], str(message["scope"])))
            for message in messages]


def nf_conntrack_max(namespace):
    """The namespace's connection table limit.

    Read inside the namespace: newer kernels may give a namespace its own value.
    """
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "cat",
         "/proc/sys/net/netfilter/nf_conntrack_max"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    try:
        return int(result.stdout.strip())
    except ValueError:
        pass
    try:
        return int(pathlib.Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    except (OSError, ValueError):
        raise InvalidInput(
            "namespace",
            namespace,
            "cannot read nf_conntrack_max (is the nf_conntrack module loaded?)",
        ) from None


# The connection table's statistics as the kernel shows them to processes in a
# namespace: a header line, then one line per CPU of hex columns. Every line's
# first column, "entries", is the namespace's whole table size (not per CPU).
CONNTRACK_STAT = "/proc/{pid}/net/stat/nf_conntrack"
# The header and the first CPU's line fit well inside this.
CONNTRACK_STAT_READ = 4096
HEX_COUNT = re.compile(r"[0-9a-fA-F]{1,16}")


def kernel_entry_count(pid):
    """Entries in the connection table of the namespace process pid lives in.

    What `conntrack -C` counts inside the namespace, read from /proc without
    forking or entering it. None when the process is gone or conntrack is not
    loaded.
    """
    try:
        descriptor = os.open(CONNTRACK_STAT.format(pid=int(pid)), os.O_RDONLY)
    except OSError:
        return None
    try:
        text = os.read(descriptor, CONNTRACK_STAT_READ).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return parse_conntrack_stat(text)


def parse_conntrack_stat(text):
    """The "entries" figure of /proc/net/stat/nf_conntrack; None if it has none."""
    lines = text.splitlines()
    if len(lines) < 2 or lines[0].split()[:1] != ["entries"]:
        return None
    fields = lines[1].split()
    if not fields or not HEX_COUNT.fullmatch(fields[0]):
        return None
    return int(fields[0], 16)


def holds_address(namespace, interface, address):
    """Whether address (an ip_interface: address and prefix) is on the interface.

    The same test the daemon's role watcher applies to address events
    (roles.role_change), on a dump of the interface's addresses. None when the
    namespace or the interface is missing, or netlink cannot be read.
    """
    from pyroute2 import IPRoute

    if namespace_inode(namespace) is None:
        return None
    try:
        # flags=0: never create a namespace that is missing.
        with IPRoute(netns=namespace, flags=0) as ipr:
            indexes = ipr.link_lookup(ifname=interface)
            if not indexes:
                return None
            messages = ipr.get_addr(index=indexes[0])
    except Exception:  # pyroute2 raises a variety of errors
        return None
    for message in messages:
        event = roles.address_event(message)  # a dump lists them as RTM_NEWADDR
        if event is not None and roles.role_change(
                event, address, interface) is roles.Role.PRIMARY:
            return True
    return False
