"""The extension against Neutron's own code (the `.[neutron]` extra, Neutron 29.0.0).

Loaded by Neutron's L3AgentExtensionsManager inside a real L3NATAgent, as
neutron-l3-agent loads it: stevedore, entry point group neutron.agent.l3.extensions,
the agent's configuration in cfg.CONF. The agent's I/O (ip, processes, RPC) is
mocked by Neutron's own unit-test framework (BasicRouterOperationsFramework of
neutron/tests/unit/agent/l3/test_agent.py); the extension's files are real.

Without neutron installed the module is skipped, unless SNAT_SYNC_REQUIRE_FUNCTIONAL
is set (CI): then it is an error.
"""

import ipaddress
import logging
import os
import time
import uuid
from unittest import mock

import pytest

try:
    from neutron.agent.l3 import agent as neutron_agent
except ImportError as error:
    if os.environ.get("SNAT_SYNC_REQUIRE_FUNCTIONAL", "") not in ("", "0"):
        raise ImportError(
            "SNAT_SYNC_REQUIRE_FUNCTIONAL is set but neutron is not installed: "
            "pip install -e '.[neutron]'") from error
    pytest.skip(f"neutron is not installed ({error}); pip install -e '.[neutron]'",
                allow_module_level=True)

import fixtures  # noqa: E402  (installed with neutron)
from neutron.agent.l3 import dvr_edge_ha_router  # noqa: E402
from neutron.agent.l3 import dvr_local_router  # noqa: E402
from neutron.agent.l3 import ha_router  # noqa: E402
from neutron.agent.l3 import l3_agent_extensions_manager  # noqa: E402
from neutron.tests.unit.agent.l3 import test_agent as neutron_test_agent  # noqa: E402
from neutron_lib import constants  # noqa: E402
from oslo_config import cfg  # noqa: E402

from snat_sync import inventory  # noqa: E402
from snat_sync import neutron_extension  # noqa: E402
from snat_sync.lab import neutron_routers  # noqa: E402

HOST = "network-1"
# What the router objects do to the node (namespaces, devices, keepalived, iptables)
# beyond what the framework mocks; the agent still creates them with its factory
# and calls its extensions around them.
ROUTER_CLASSES = (ha_router.HaRouter, dvr_edge_ha_router.DvrEdgeHaRouter,
                  dvr_local_router.DvrLocalRouter)
ROUTER_IO = ("initialize", "process", "delete")


def new_router(vrid=7, distributed=False):
    return neutron_routers.router_dict(str(uuid.uuid4()), str(uuid.uuid4()),
                                       "169.254.192.5", vrid, distributed=distributed)


@pytest.mark.parametrize("vrid, distributed, mode", [
    (7, False, "legacy"), (254, False, "legacy"), (7, True, "dvr_snat"),
    (254, True, "dvr_snat")])
def test_the_spec_is_what_neutrons_router_classes_compute(tmp_path, vrid, distributed,
                                                          mode):
    conf = neutron_routers.agent_conf(tmp_path / "neutron", tmp_path / "ha", mode)
    router = new_router(vrid, distributed)
    ri = neutron_routers.router_object(conf, router)
    assert isinstance(ri, dvr_edge_ha_router.DvrEdgeHaRouter if distributed
                      else ha_router.HaRouter)

    spec = neutron_extension.spec_from_router(router, mode)

    assert spec.namespace == ri.ha_namespace
    assert spec.ha_interface == ri.get_ha_device_name()
    assert spec.primary_address == ipaddress.ip_interface(ri._get_primary_vip())
    assert spec.vrid == ri.ha_vr_id == vrid
    # the address Neutron's own conntrackd binds on the HA interface
    assert spec.local_address == ipaddress.ip_address(
        ri._get_conntrackd_ipv4_interface())
    instance = ri.keepalived_manager.config.get_instance(vrid)
    assert (instance.interface, instance.vrouter_id) == (spec.ha_interface, spec.vrid)


class TestInTheL3Agent(neutron_test_agent.BasicRouterOperationsFramework):
    """A real L3NATAgent on cfg.CONF, as neutron-l3-agent runs."""

    def setUp(self):
        super().setUp()
        for router_class in ROUTER_CLASSES:
            for method in ROUTER_IO:
                mock.patch.object(router_class, method, autospec=True).start()
        directory = self.useFixture(fixtures.TempDir()).path
        self.state_path = os.path.join(directory, "snat-sync")
        conf = neutron_routers.register_agent_options(cfg.CONF)
        conf.register_opts(neutron_extension.OPTS, group=neutron_extension.GROUP)
        # as the framework's own configuration has it, but Neutron's conntrackd off
        conf.set_override("interface_driver",
                          "neutron.agent.linux.interface.NullDriver")
        conf.set_override("ha_confs_path", os.path.join(directory, "ha"))
        conf.set_override("enable_metadata_proxy", False)
        conf.set_override("extensions", ["snat_sync"], group="agent")
        conf.set_override("state_path", self.state_path,
                          group=neutron_extension.GROUP)
        self.conf = conf  # cfg.CONF.reset runs at the end of every Neutron test

    def agent(self, mode="legacy"):
        self.conf.set_override("agent_mode", mode)
        agent = neutron_agent.L3NATAgent(HOST, self.conf)
        agent.init_host()
        return agent

    def specs(self):
        return inventory.read_neutron_specs(self.state_path)

    def test_the_agent_loads_it_through_its_extensions_manager(self):
        agent = self.agent()
        manager = agent.l3_ext_manager
        self.assertIsInstance(manager, l3_agent_extensions_manager.
                              L3AgentExtensionsManager)
        self.assertEqual(["snat_sync"], manager.names())
        loaded = manager["snat_sync"].obj
        self.assertIsInstance(loaded, neutron_extension.SnatSyncExtension)
        self.assertIs(loaded.conf, cfg.CONF)
        self.assertTrue(os.path.isdir(os.path.join(self.state_path,
                                                   inventory.NEUTRON_DIRECTORY)))

    def test_add_update_and_delete_through_the_agent(self):
        agent = self.agent()
        router = new_router(vrid=7)
        router_id = router["id"]

        agent._process_router_if_compatible(router)  # not cached yet: add
        ri = agent.router_info[router_id]
        self.assertIsInstance(ri, ha_router.HaRouter)
        ri.set_ha_port()
        ri._init_keepalived_manager(process_monitor=None)
        spec = self.specs()[router_id]
        self.assertEqual((ri.ha_namespace, ri.get_ha_device_name(), 7),
                         (spec.namespace, spec.ha_interface, spec.vrid))
        self.assertEqual(ipaddress.ip_interface(ri._get_primary_vip()),
                         spec.primary_address)

        changed = dict(router, ha_vr_id=9)
        agent._process_router_if_compatible(changed)  # cached: update
        self.assertEqual(9, self.specs()[router_id].vrid)

        self.assertTrue(agent._safe_router_removed(router_id))
        self.assertEqual({}, self.specs())
        self.assertNotIn(router_id, agent.router_info)

    def test_ha_state_change_reaches_it_and_changes_no_file(self):
        self.conf.set_override("ha_vrrp_advert_int", 1)
        # the agent records the state in the router's ha_confs_path directory
        mock.patch.object(ha_router.HaRouter, "ha_state",
                          new_callable=mock.PropertyMock).start()
        agent = self.agent()
        router = new_router()
        agent._process_router_if_compatible(router)
        ri = agent.router_info[router["id"]]
        ri.radvd, ri.keepalived_manager = mock.Mock(), mock.Mock()  # by initialize
        inbox = os.path.join(self.state_path, inventory.NEUTRON_DIRECTORY)
        before = sorted(os.listdir(inbox))
        with self.assertLogs("snat_sync.neutron_extension", logging.INFO) as logs:
            agent.enqueue_state_change(router["id"], "primary")  # after advert_int
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                    "reports router" in line for line in logs.output):
                time.sleep(0.05)
        self.assertIn(f"Neutron reports router {router['id']} primary",
                      "\n".join(logs.output))
        self.assertEqual(before, sorted(os.listdir(inbox)))

    def test_a_dvr_ha_router_on_a_dvr_snat_agent_is_handed_over(self):
        agent = self.agent("dvr_snat")
        router = new_router(vrid=254, distributed=True)
        agent._process_router_if_compatible(router)
        ri = agent.router_info[router["id"]]
        self.assertIsInstance(ri, dvr_edge_ha_router.DvrEdgeHaRouter)
        ri.set_ha_port()
        spec = self.specs()[router["id"]]
        self.assertEqual((f"snat-{router['id']}", ri.get_ha_device_name()),
                         (spec.namespace, spec.ha_interface))

    def test_a_dvr_ha_router_on_dvr_and_dvr_no_external_agents_is_ignored(self):
        for mode in (constants.L3_AGENT_MODE_DVR,
                     constants.L3_AGENT_MODE_DVR_NO_EXTERNAL):
            with self.subTest(mode=mode):
                agent = self.agent(mode)
                router = new_router(distributed=True)  # with its HA port
                agent._process_router_if_compatible(router)
                ri = agent.router_info[router["id"]]
                # Neutron treats it as a plain distributed router: no keepalived
                self.assertIs(type(ri), dvr_local_router.DvrLocalRouter)
                self.assertEqual({}, self.specs())

    def test_the_agent_refuses_to_start_with_neutrons_conntrackd_on(self):
        self.conf.set_override("ha_conntrackd_enabled", True)
        agent = neutron_agent.L3NATAgent(HOST, self.conf)
        with self.assertRaisesRegex(neutron_extension.ConntrackdConflict,
                                    "ha_conntrackd_enabled"):
            agent.init_host()  # where the agent loads its extensions
