"""Neutron L3 agent extension `snat_sync`: the agent tells snat-sync about its routers.

Enable it in the L3 agent's configuration with `[agent] extensions = snat_sync`; the
agent loads it through stevedore from the entry point group
`neutron.agent.l3.extensions`. Options, in the agent's configuration:

    [snat_sync]
    state_path = /var/lib/snat-sync

Hand-over: for every HA router the agent hosts, the extension writes the router's
spec to <state_path>/neutron/<router_id>.json, and deletes the file when the router
goes; `snat-sync daemon` (one per node, root) picks the files up within a second and
adds, changes or removes the router. It does not call the manager in-process
because:
  * adding a router starts conntrackd in the namespace and loads nftables rules:
    root's work, while the agent usually runs unprivileged behind privsep;
  * the agent handles routers in a pool of green threads and must not block on a
    conntrackd that takes seconds to start, nor die with one;
  * the daemon outlives agent restarts and keeps supervising conntrackd meanwhile.
The daemon treats the files as untrusted input and checks them again. Where the agent
runs unprivileged, create <state_path>/neutron owned by the agent's user; the rest
of the state path stays root's.

What the spec is made of, from the router dict the agent hands over: the HA port
`_ha_interface` (this node's only: the dict carries no other node's port, so the
router syncs by multicast on its HA network and needs no peer list), its device name
`ha-<port id>` cut to 14 characters, its first fixed IP as the local address, the
VRID `ha_vr_id`, the namespace (`qrouter-<id>`, or `snat-<id>` for a distributed
router, whose SNAT and keepalived live there), and the primary address keepalived
puts on the HA interface while primary, which the daemon's watcher looks for.
Neutron's keepalived configuration has no notify lines, so that watcher is what
starts each failover's commit. `ha_state_change` arrives about advert_int after the
address moved: too late for the commit, it is only logged (the daemon's `status`
shows the role from the address itself; Neutron's view is `openstack network agent
list --router <id> --long`).

Agent modes: only a `legacy` or `dvr_snat` agent runs keepalived for an HA router.
On `dvr` and `dvr_no_external` agents (compute nodes) Neutron builds a distributed
HA router as a plain DVR router without VRRP, whatever the router dict carries, so
the extension ignores distributed routers there by the agent's `agent_mode`.

Neutron's own conntrackd (`ha_conntrackd_enabled`) would fight snat-sync's for the
same table and sync port: with it on, the extension refuses to start.
"""

import ipaddress
import logging
import os

from neutron_lib.agent import l3_extension
from oslo_config import cfg

from snat_sync import inventory
from snat_sync import statedir
from snat_sync.errors import InvalidInput, SnatSyncError
from snat_sync.router import RouterSpec, check_router_id

LOG = logging.getLogger(__name__)

OPTS = [
    cfg.StrOpt("state_path", default="/var/lib/snat-sync",
               help="snat-sync's state path: router specs go to its neutron/ "
               "directory, where `snat-sync daemon` reads them."),
]
GROUP = "snat_sync"

HA_DEVICE_PREFIX = "ha-"
DEVICE_NAME_LENGTH = 14  # Neutron's interface drivers cut device names to this.
# Where Neutron's keepalived takes the primary address from: the first free /24 of
# the link-local range, avoiding the metadata address, DVR's FIP range and the HA
# networks; the VRID is the host part.
LINK_LOCAL_RANGE = ipaddress.ip_network("169.254.0.0/16")
NEUTRON_RESERVED = (ipaddress.ip_network("169.254.169.254/32"),
                    ipaddress.ip_network("169.254.64.0/18"))
PRIMARY_PREFIX_LENGTH = 24
# The agent modes (neutron_lib.constants L3_AGENT_MODE_*) and the one whose agent
# hosts a distributed router's SNAT side with its keepalived.
DEFAULT_AGENT_MODE = "legacy"  # Neutron's default for agent_mode
DVR_SNAT_AGENT_MODE = "dvr_snat"


class Ignored(Exception):
    """The router is not one snat-sync handles; the message says why."""


class ConntrackdConflict(SnatSyncError):
    pass


def primary_address(vrid, ha_cidrs):
    """The address Neutron's keepalived holds on the HA interface while primary.

    Neutron picks the first /24 of 169.254.0.0/16 that overlaps none of its reserved
    ranges and none of the router's HA subnets, and adds the VRID to it: normally
    169.254.0.<VRID>/24.
    """
    excluded = [*NEUTRON_RESERVED, *(ipaddress.ip_network(cidr, strict=False)
                                     for cidr in ha_cidrs)]
    for candidate in LINK_LOCAL_RANGE.subnets(new_prefix=PRIMARY_PREFIX_LENGTH):
        if not any(candidate.overlaps(network) for network in excluded):
            return ipaddress.ip_interface(
                f"{candidate.network_address + vrid}/{PRIMARY_PREFIX_LENGTH}")
    raise Ignored("no free /24 for the primary address in 169.254.0.0/16")


def spec_from_router(router, agent_mode=DEFAULT_AGENT_MODE):
    """The RouterSpec of a router dict as an L3 agent in agent_mode has it;
    Ignored if none."""
    router_id = router.get("id")
    if not router.get("ha"):
        kind = "a DVR-only" if router.get("distributed") else "not an HA"
        raise Ignored(f"{kind} router")
    if router.get("distributed") and agent_mode != DVR_SNAT_AGENT_MODE:
        raise Ignored(f"a distributed router on an agent in mode {agent_mode}: only "
                      f"{DVR_SNAT_AGENT_MODE} agents run its keepalived")
    port = router.get("_ha_interface")
    if not port:
        raise Ignored("no HA port on this node (a DVR compute node hosts no SNAT)")
    fixed_ips = port.get("fixed_ips") or []
    if not fixed_ips:
        raise Ignored(f"HA port {port.get('id')} has no fixed IP")
    prefix = "snat-" if router.get("distributed") else "qrouter-"
    vrid = router.get("ha_vr_id")
    try:
        return RouterSpec.create(
            router_id=router_id,
            namespace=f"{prefix}{router_id}",
            ha_interface=f"{HA_DEVICE_PREFIX}{port['id']}"[:DEVICE_NAME_LENGTH],
            local_address=fixed_ips[0]["ip_address"],
            peer_addresses=(),
            vrid=vrid,
            primary_address=str(primary_address(
                int(vrid), [subnet["cidr"] for subnet in port.get("subnets", [])])),
        )
    except (InvalidInput, KeyError, TypeError, ValueError) as error:
        raise Ignored(f"cannot derive its spec: {error}") from None


def agent_mode(conf):
    """The L3 agent's agent_mode; Neutron's default where no agent registered it."""
    try:
        return conf.agent_mode
    except cfg.NoSuchOptError:
        return DEFAULT_AGENT_MODE


def check_no_neutron_conntrackd(conf):
    """Refuse to run beside Neutron's in-tree conntrackd.

    The option exists only where neutron's L3 agent registered it.
    """
    try:
        enabled = conf.ha_conntrackd_enabled
    except cfg.NoSuchOptError:
        return
    if enabled:
        raise ConntrackdConflict(
            "snat_sync refuses to run: the L3 agent's own conntrackd is on "
            "(ha_conntrackd_enabled = True). Both would run a conntrackd in every HA "
            "router's namespace on the same sync port and fight over its connection "
            "table. Set ha_conntrackd_enabled = False, or remove snat_sync from "
            "[agent] extensions.")


class SnatSyncExtension(l3_extension.L3AgentExtension):
    """Writes each HA router's spec for `snat-sync daemon`, removes it on delete."""

    def __init__(self, conf=None):
        self.conf = conf or cfg.CONF
        self.inbox = None
        self.agent_mode = DEFAULT_AGENT_MODE

    def initialize(self, connection, driver_type):
        self.conf.register_opts(OPTS, group=GROUP)
        check_no_neutron_conntrackd(self.conf)
        self.agent_mode = agent_mode(self.conf)
        state_path = statedir.check_state_path(self.conf.snat_sync.state_path)
        self.inbox = state_path / inventory.NEUTRON_DIRECTORY
        statedir.ensure_directory(self.inbox)
        LOG.info("snat_sync: router specs go to %s for snat-sync daemon", self.inbox)

    def add_router(self, context, data):
        self._write(data)

    def update_router(self, context, data):
        self._write(data)

    def delete_router(self, context, data):
        router_id = data.get("id") or data.get("router_id")
        path = self._path(router_id)
        if path is None:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        LOG.info("snat_sync: router %s removed", router_id)

    def ha_state_change(self, context, data):
        """Only logged: Neutron reports a change about advert_int after the address
        moved, when the daemon's watcher has long run the transition."""
        router_id, state = data.get("router_id"), data.get("state")
        path = self._path(router_id)
        if path is None or not path.exists():
            return
        LOG.info("snat_sync: Neutron reports router %s %s", router_id, state)

    def update_network(self, context, data):
        """Network changes do not concern snat-sync."""

    def _write(self, router):
        try:
            spec = spec_from_router(router, self.agent_mode)
        except Ignored as reason:
            LOG.info("snat_sync: ignoring router %s: %s", router.get("id"), reason)
            path = self._path(router.get("id"))
            if path is not None and path.exists():  # it was one we handled
                self.delete_router(None, router)
            return
        path = self.inbox / f"{spec.router_id}.json"
        if statedir.read_json(path) != spec.to_dict():
            statedir.write_json(path, spec.to_dict())
            LOG.info("snat_sync: router %s handed to snat-sync daemon (namespace %s, "
                     "VRID %d)", spec.router_id, spec.namespace, spec.vrid)

    def _path(self, router_id):
        """The spec file of router_id; None for an id that is no valid file name."""
        try:
            return self.inbox / f"{check_router_id(router_id)}.json"
        except InvalidInput:
            LOG.warning("snat_sync: ignoring router id %r", router_id)
            return None
