"""HA routers as Neutron 29.0.0's L3 agent builds them, for tests against its code.

Needs the `neutron` extra (`pip install -e '.[neutron]'`). Everything here asks
Neutron's own code: the router dicts come from its test helpers
(`l3_test_common.prepare_router_data`), the router objects are its `HaRouter` and
`DvrEdgeHaRouter`, the keepalived.conf is what its `KeepalivedManager` writes for
the router, and the state-change monitor's command line is the one its `HaRouter`
spawns. Nothing is plugged: Neutron's interface drivers need Open vSwitch, so the
functional test builds the devices itself under the names these objects give.
"""

import contextlib
import copy
import dataclasses
import http.server
import os
import pathlib
import shutil
import socketserver
import subprocess
import sys
import sysconfig
import threading
import uuid

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

STATE_CHANGE_PROGRAM = ha_router.STATE_CHANGE_PROC_NAME
SNAT_PORT_ADDRESS = topology.INTERNAL_VIP


def register_agent_options(conf):
    """Register the options neutron-l3-agent registers (neutron.agent.l3_agent)."""
    l3_agent.register_opts(conf)
    return conf


def agent_conf(state_path, ha_confs_path, agent_mode="legacy"):
    """A private L3 agent configuration: Neutron's options, the NullDriver."""
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
    # the helper's extra subnet 9.4.5.0/24 would be an on-link route to nowhere here
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
    return router


def _sibling_id(port_id):
    """Another port id that shares the first eight digits (and the lab tag)."""
    head, _, tail = port_id.partition("-")
    return f"{head}-{tail[:-2]}{(int(tail[-2:], 16) + 1) % 256:02x}"


def router_object(conf, router, host="network-1"):
    """The router object a legacy (HaRouter) or, for a distributed router, a
    dvr_snat agent (DvrEdgeHaRouter) creates for the dict, as its router factory
    picks them (neutron.agent.l3.agent), with its keepalived configuration made."""
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


# --- the lab's two nodes as Neutron builds them ----------------------------------


@dataclasses.dataclass
class NeutronNode:
    """One network node of the lab's HA router as Neutron's L3 agent has it.

    The two nodes live on one machine, whose namespace names are global: each node
    hosts the router under its own id, so that its qrouter-<id> (snat-<id>)
    namespace does not collide with the other's. Nothing pairs the nodes by router
    id: keepalived pairs by VRID on the HA network, conntrackd by its sync port.
    The ids begin with the lab's tag, and so the namespaces' and ha- devices' names
    carry it.
    """

    name: str
    router: dict  # the router dict the agent hands to its extensions
    ri: object  # Neutron's HaRouter or DvrEdgeHaRouter
    conf: cfg.ConfigOpts  # the node's L3 agent configuration
    ha_address: str
    directory: pathlib.Path

    @property
    def router_id(self):
        return self.router["id"]

    @property
    def state_path(self):
        """snat-sync's state path on this node (the extension writes neutron/)."""
        return self.directory / "s"


def lab_id(tag, number):
    """A UUID whose first group is the lab's tag and number (two hex digits)."""
    return f"{tag}{number:02x}" + str(uuid.uuid4())[8:]


def neutron_nodes(workdir, tag, vrid, distributed):
    """The lab's two nodes r1 and r2: Neutron's router dicts and objects for them,
    on a legacy agent or, distributed, on a dvr_snat agent."""
    mode = "dvr_snat" if distributed else "legacy"
    internal_port, gateway_port = lab_id(tag, 1), lab_id(tag, 2)
    nodes = []
    for index, (name, ha_address) in enumerate(zip(("r1", "r2"),
                                                    topology.HA_ADDRESSES)):
        directory = pathlib.Path(workdir) / name
        conf = agent_conf(directory / "neutron", directory / "ha", mode)
        router = router_dict(lab_id(tag, 0x10 + index), lab_id(tag, 0x20 + index),
                             ha_address, vrid, distributed, internal_port,
                             gateway_port)
        nodes.append(NeutronNode(name, router, router_object(
            conf, router, host=f"network-{index + 1}"), conf, ha_address, directory))
    return nodes


def lab_routers_for(nodes):
    """A `routers` factory for topology.build_lab: the nodes' namespaces and legs
    under Neutron's names (ha-, qr- or on DVR sg-, qg- + port id), Neutron's
    priority for both."""
    def routers(prefix, tag):
        built = []
        for node, peer in zip(nodes, reversed(nodes)):
            names = devices(node.ri)
            built.append(topology.Router(
                node.name, names.namespace,
                topology.Leg(f"{node.name}-qr", names.internal, "br-int"),
                topology.Leg(f"{node.name}-ha", names.ha, "br-ha"),
                topology.Leg(f"{node.name}-qg", names.external, "br-ext"),
                node.ha_address, peer.ha_address, node.ri.ha_priority))
        return tuple(built)
    return routers


def start_keepalived(lab, router, config_path):
    """keepalived on Neutron's keepalived.conf, with Neutron's options (VRRP only,
    its pid files beside the config), kept in the foreground for the lab."""
    directory = pathlib.Path(config_path).parent
    router.keepalived = topology.start_process(
        lab, router.namespace,
        ["keepalived", "-P", "-f", config_path, "-p", directory / "keepalived.pid",
         "-r", directory / "keepalived.pid-vrrp", "--dont-fork", "--log-console",
         "--no-syslog"],
        directory / "keepalived.log")
    return router.keepalived


def start_state_change_monitor(lab, node):
    """neutron-keepalived-state-change for node, in the root namespace as the
    agent's ProcessManager runs it; kept in lab.processes."""
    directory = pathlib.Path(node.ri.keepalived_manager.get_conf_dir())
    with open(directory / "state-change.out", "ab") as log:
        process = subprocess.Popen(
            state_change_command(node.ri, directory / "monitor.pid"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    lab.processes.append(process)
    return process


class StateChangeReceiver:
    """Stands in for the L3 agent's keepalived state change server.

    neutron-keepalived-state-change POSTs each state it detects to the UNIX socket
    <Neutron's state_path>/keepalived-state-change (headers X-Neutron-Router-Id,
    X-Neutron-State). The receiver answers, records (router id, state), and hands
    the change to `on_change` the way the agent's enqueue_state_change ends in its
    extensions' ha_state_change.
    """

    def __init__(self, socket_path, on_change=None):
        self.socket_path = str(socket_path)
        self.received = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                change = (self.headers.get("X-Neutron-Router-Id"),
                          self.headers.get("X-Neutron-State"))
                receiver.received.append(change)
                if on_change is not None:
                    on_change({"router_id": change[0], "state": change[1]})
                self.send_response(200)
                self.end_headers()

            def address_string(self):
                return "keepalived-state-change"

            def log_message(self, *args):
                """Quiet: the test reads `received`."""

        pathlib.Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.server = socketserver.ThreadingUnixStreamServer(self.socket_path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


def stop_state_change_monitors(processes, timeout=5):
    """SIGTERM all at once: each one's trap takes a second to stop its ip monitor."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
