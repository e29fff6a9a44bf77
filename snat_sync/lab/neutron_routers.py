"""HA routers as Neutron 29.0.0's L3 agent builds them, for tests against its code.

Needs the `neutron` extra (`pip install -e '.[neutron]'`). Everything here asks
Neutron's own code: the router dicts come from its test helpers
(`l3_test_common.prepare_router_data`), the router objects are its `HaRouter` and
`DvrEdgeHaRouter`, the keepalived.conf is what its `KeepalivedManager` writes for
the router, and the state-change monitor's command line is the one its `HaRouter`
spawns. Nothing is plugged: Neutron's interface drivers need Open vSwitch, so the
functional test builds the devices itself under the names these objects give.
"""

import copy
import dataclasses
import os
import pathlib
import shutil
import sys
import sysconfig

from neutron.agent import l3_agent
from neutron.agent.l3 import dvr_edge_ha_router
from neutron.agent.l3 import ha_router
from neutron.agent.linux import interface
from neutron.conf import common as neutron_common
from neutron.tests.common import l3_test_common
from neutron_lib import constants
from oslo_config import cfg
from oslo_log import log as oslo_log

from snat_sync.lab import topology

NEUTRON_RELEASE = "29.0.0"
STATE_CHANGE_PROGRAM = ha_router.STATE_CHANGE_PROC_NAME
SNAT_PORT_ADDRESS = topology.INTERNAL_VIP


def register_agent_options(conf):
    """Register the options neutron-l3-agent registers (neutron.agent.l3_agent)."""
    l3_agent.register_opts(conf)
    return conf


def agent_conf(state_path, ha_confs_path, agent_mode="legacy"):
    """A private L3 agent configuration: Neutron's options, NullDriver, no conntrackd."""
    conf = register_agent_options(cfg.ConfigOpts())
    conf.register_opts(neutron_common.core_opts)
    conf.register_cli_opts(neutron_common.core_cli_opts)
    oslo_log.register_options(conf)
    conf([], project="neutron")
    conf.set_override("interface_driver", "neutron.agent.linux.interface.NullDriver")
    conf.set_override("agent_mode", agent_mode)
    conf.set_override("state_path", str(state_path))
    conf.set_override("ha_confs_path", str(ha_confs_path))
    return conf


def router_dict(router_id, ha_port_id, ha_address, vrid, distributed=False,
                internal_port_id=None, gateway_port_id=None):
    """One node's router dict for an HA (or DVR+HA) router on the lab's networks.

    Made by Neutron's prepare_router_data and given the lab's addresses and ids:
    the internal port 192.168.100.1/24, the gateway 203.0.113.10/24, this node's HA
    port `ha_port_id` with `ha_address` on 169.254.192.0/18.
    """
    router = l3_test_common.prepare_router_data(
        enable_ha=True, vrrp_id=vrid, enable_snat=True,
        ip_address=topology.GATEWAY_ADDRESS, subnet_cidr="203.0.113.0/24",
        gateway_ip="203.0.113.1", ha_port_ip=ha_address)
    router["id"] = router_id
    router["distributed"] = distributed
    router["external_gateway_info"]["network_id"] = router["gw_port"]["network_id"]
    router["gw_port"]["extra_subnets"] = []
    if gateway_port_id:
        router["gw_port"]["id"] = gateway_port_id
    router[constants.HA_INTERFACE_KEY]["id"] = ha_port_id
    internal = router[constants.INTERFACE_KEY][0]
    if internal_port_id:
        internal["id"] = internal_port_id
    internal["fixed_ips"][0]["ip_address"] = topology.INTERNAL_VIP
    internal["subnets"][0].update(cidr="192.168.100.0/24",
                                  gateway_ip=topology.INTERNAL_VIP)
    if distributed:
        snat_port = copy.deepcopy(internal)
        snat_port["id"] = _sibling_id(internal["id"])
        snat_port["device_owner"] = constants.DEVICE_OWNER_ROUTER_SNAT
        snat_port["fixed_ips"][0]["ip_address"] = SNAT_PORT_ADDRESS
        router[constants.SNAT_ROUTER_INTF_KEY] = [snat_port]
        router["gw_port_host"] = None
    return router


def _sibling_id(port_id):
    """Another port id that shares the first eight digits (and the lab tag)."""
    head, _, tail = port_id.partition("-")
    return f"{head}-{tail[:-2]}{(int(tail[-2:], 16) + 1) % 256:02x}"


def router_object(conf, router, host="network-1"):
    """The router object the L3 agent creates for the dict in its agent_mode.

    The agent's router factory picks HaRouter for an HA router and, on a dvr_snat
    agent, DvrEdgeHaRouter for a distributed one (neutron.agent.l3.agent).
    """
    kwargs = dict(agent=_Agent(host), router_id=router["id"], router=router,
                  use_ipv6=False, agent_conf=conf,
                  interface_driver=interface.NullDriver(conf))
    if router.get("distributed"):
        ri = dvr_edge_ha_router.DvrEdgeHaRouter(host, **kwargs)
    else:
        ri = ha_router.HaRouter(**kwargs)
    ri.set_ha_port()
    ri._init_keepalived_manager(process_monitor=None)
    return ri


@dataclasses.dataclass
class _Agent:
    host: str


@dataclasses.dataclass(frozen=True)
class NeutronDevices:
    """The device names and namespace Neutron gives one node's router."""

    namespace: str
    ha: str
    internal: str
    external: str


def devices(ri):
    router = ri.router
    internal = router[constants.INTERFACE_KEY][0]
    if router.get("distributed"):
        snat_port = router[constants.SNAT_ROUTER_INTF_KEY][0]
        internal_name = ri._get_snat_int_device_name(snat_port["id"])
        external_name = ri.get_snat_external_device_interface_name(router["gw_port"])
    else:
        internal_name = ri.get_internal_device_name(internal["id"])
        external_name = ri.get_external_device_name(router["gw_port"]["id"])
    return NeutronDevices(ri.ha_namespace, ri.get_ha_device_name(), internal_name,
                          external_name)


def write_keepalived_config(ri):
    """Give keepalived the router's addresses as the agent's processing does and
    let Neutron's KeepalivedManager write keepalived.conf; return its path.

    The internal port's (on DVR: its SNAT port's) and the gateway port's addresses
    become VIPs, the gateway's default route a virtual route, as HaRouter's
    internal_network_added and external_gateway_added leave them.
    """
    router = ri.router
    names = devices(ri)
    internal = (router[constants.SNAT_ROUTER_INTF_KEY][0] if router.get("distributed")
                else router[constants.INTERFACE_KEY][0])
    ri._add_vips(internal, names.internal)
    ri._add_gateway_vip(router["gw_port"], names.external)
    manager = ri.keepalived_manager
    manager._output_config_file()
    return pathlib.Path(manager.get_full_config_file_path("keepalived.conf"))


def state_change_command(ri, pid_file):
    """The neutron-keepalived-state-change command line HaRouter spawns, with the
    program resolved where the neutron package installed its scripts."""
    argv = ri._get_state_change_monitor_callback()(str(pid_file))
    return [state_change_program(), *argv[1:]]


def state_change_program():
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = shutil.which(STATE_CHANGE_PROGRAM, path=directory)
        if candidate:
            return candidate
    found = shutil.which(STATE_CHANGE_PROGRAM)
    if found is None:
        raise topology.LabError(f"{STATE_CHANGE_PROGRAM} not found: is the neutron "
                                "extra installed?")
    return found
