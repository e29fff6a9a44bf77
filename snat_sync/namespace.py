"""Facts read from a router's network namespace (netlink, /proc): the thin edge.

Nothing here changes the namespace.
"""

import ipaddress
import os
import pathlib
import subprocess

from snat_sync.errors import InvalidInput
from snat_sync.render import NamespaceFacts

NETNS_RUN_DIR = pathlib.Path("/run/netns")


def namespace_path(namespace):
    return NETNS_RUN_DIR / namespace


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


def gather_facts(spec):
    """Check that the router's namespace, interface and address exist; learn the rest.

    Raises InvalidInput naming the missing piece.
    """
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
    for peer in spec.peer_addresses:
        if peer not in ha_network:
            raise InvalidInput(
                "peer address", str(peer), f"not in the HA network {ha_network}"
            )
    return NamespaceFacts(ha_network, nf_conntrack_max(spec.namespace))


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
