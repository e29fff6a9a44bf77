"""The Neutron L3 agent extension, loaded the way the agent loads it and driven with
router dicts shaped like the ones the agent hands to its extensions."""

import copy
import ipaddress
import logging

import pytest
from neutron_lib.agent import l3_extension
from oslo_config import cfg
from stevedore import named

from snat_sync import inventory
from snat_sync import neutron_extension
from snat_sync.neutron_extension import ConntrackdConflict, SnatSyncExtension

ROUTER_ID = "5b2d9c1e-3f4a-4b6c-8d7e-9f0a1b2c3d4e"
HA_PORT_ID = "1a2b3c4d-5e6f-4a5b-8c9d-0e1f2a3b4c5d"
HA_NETWORK_ID = "9e8d7c6b-5a49-4837-a261-5f4e3d2c1b0a"

# What the L3 agent has for an HA router on one of its nodes (as the server's
# sync_routers answers it, _ha_interface being this node's HA port).
HA_ROUTER = {
    "id": ROUTER_ID,
    "name": "router1",
    "tenant_id": "c4f5e6d7a8b94c0d9e1f2a3b4c5d6e7f",
    "project_id": "c4f5e6d7a8b94c0d9e1f2a3b4c5d6e7f",
    "admin_state_up": True,
    "status": "ACTIVE",
    "distributed": False,
    "ha": True,
    "ha_vr_id": 7,
    "flavor_id": None,
    "routes": [],
    "gw_port_id": "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f",
    "external_gateway_info": {
        "network_id": "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0",
        "enable_snat": True,
        "external_fixed_ips": [{"subnet_id": "6a7b8c9d-0e1f-4a2b-9c3d-4e5f6a7b8c9d",
                                "ip_address": "203.0.113.10"}],
    },
    "_interfaces": [{
        "id": "7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a",
        "device_owner": "network:ha_router_replicated_interface",
        "fixed_ips": [{"subnet_id": "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e",
                       "ip_address": "192.168.100.1", "prefixlen": 24}],
        "mac_address": "fa:16:3e:aa:bb:01",
    }],
    "_floatingips": [],
    "_ha_interface": {
        "id": HA_PORT_ID,
        "name": "HA port tenant c4f5e6d7a8b94c0d9e1f2a3b4c5d6e7f",
        "network_id": HA_NETWORK_ID,
        "mac_address": "fa:16:3e:12:34:56",
        "device_owner": "network:router_ha_interface",
        "device_id": ROUTER_ID,
        "admin_state_up": True,
        "binding:host_id": "network-1",
        "fixed_ips": [{"subnet_id": "8f9e0d1c-2b3a-4c4d-9e5f-6a7b8c9d0e1f",
                       "ip_address": "169.254.192.5", "prefixlen": 18}],
        "subnets": [{"id": "8f9e0d1c-2b3a-4c4d-9e5f-6a7b8c9d0e1f",
                     "cidr": "169.254.192.0/18", "gateway_ip": None,
                     "dns_nameservers": [], "ipv6_ra_mode": None,
                     "subnetpool_id": None}],
        "extra_subnets": [],
        "address_scopes": {"4": None, "6": None},
        "mtu": 1450,
    },
    "_ha_state": "standby",
}


def router(**changes):
    copied = copy.deepcopy(HA_ROUTER)
    copied.update(changes)
    return copied


@pytest.fixture
def agent_conf(tmp_path):
    """A private ConfigOpts standing in for the agent's cfg.CONF."""
    conf = cfg.ConfigOpts()
    conf([], project="neutron")
    conf.register_opts(neutron_extension.OPTS, group=neutron_extension.GROUP)
    conf.set_override("state_path", str(tmp_path / "state"),
                      group=neutron_extension.GROUP)
    return conf


def load(conf):
    """Load the extension by name from its entry point, as the L3 agent does."""
    manager = named.NamedExtensionManager(
        "neutron.agent.l3.extensions", ["snat_sync"], invoke_on_load=True,
        invoke_kwds={"conf": conf}, name_order=True, on_missing_entrypoints_callback=
        lambda names: pytest.fail(f"entry points missing: {names}"))
    return manager["snat_sync"].obj


@pytest.fixture
def extension(agent_conf):
    loaded = load(agent_conf)
    loaded.initialize(connection=None, driver_type="ovs")
    return loaded


def inbox(agent_conf):
    return inventory.read_neutron_specs(agent_conf.snat_sync.state_path)


def test_stevedore_loads_it_by_name_as_an_l3_agent_extension(agent_conf):
    loaded = load(agent_conf)
    assert isinstance(loaded, SnatSyncExtension)
    assert isinstance(loaded, l3_extension.L3AgentExtension)


def test_it_loads_without_arguments_like_the_agent_does():
    manager = named.NamedExtensionManager(
        "neutron.agent.l3.extensions", ["snat_sync"], invoke_on_load=True)
    assert manager["snat_sync"].obj.conf is cfg.CONF


def test_add_router_hands_the_spec_to_the_daemon(extension, agent_conf):
    extension.add_router(None, router())

    spec = inbox(agent_conf)[ROUTER_ID]
    assert spec.namespace == f"qrouter-{ROUTER_ID}"
    assert spec.ha_interface == "ha-1a2b3c4d-5e"
    assert spec.local_address == ipaddress.ip_address("169.254.192.5")
    assert spec.vrid == 7
    assert spec.peer_addresses == ()
    assert spec.primary_address == ipaddress.ip_interface("169.254.0.7/24")
    assert spec.sync_channel("auto", 3780, "225.0.0.50").transport == "multicast"


def test_update_router_rewrites_only_what_changed(extension, agent_conf):
    extension.add_router(None, router())
    path = extension.inbox / f"{ROUTER_ID}.json"
    written = path.stat().st_mtime_ns

    extension.update_router(None, router(_ha_state="active"))
    assert path.stat().st_mtime_ns == written

    extension.update_router(None, router(ha_vr_id=9))
    assert inbox(agent_conf)[ROUTER_ID].vrid == 9


def test_delete_router_takes_it_away(extension, agent_conf):
    extension.add_router(None, router())
    extension.ha_state_change(None, {"router_id": ROUTER_ID, "state": "primary"})

    extension.delete_router(None, router())

    assert inbox(agent_conf) == {}
    assert list(extension.inbox.iterdir()) == []
    extension.delete_router(None, router())  # twice is fine


def test_ha_state_change_is_only_logged(extension, agent_conf, caplog):
    extension.add_router(None, router())
    before = sorted((path.name, path.read_bytes())
                    for path in extension.inbox.iterdir())

    with caplog.at_level(logging.INFO, logger="snat_sync.neutron_extension"):
        extension.ha_state_change(None, {"router_id": ROUTER_ID, "state": "primary"})

    assert sorted((path.name, path.read_bytes())
                  for path in extension.inbox.iterdir()) == before
    assert f"Neutron reports router {ROUTER_ID} primary" in caplog.text


def test_ha_state_change_of_an_unknown_router_is_ignored(extension):
    extension.ha_state_change(None, {"router_id": ROUTER_ID, "state": "backup"})
    extension.ha_state_change(None, {"router_id": "../etc", "state": "backup"})
    assert list(extension.inbox.iterdir()) == []


@pytest.mark.parametrize("changes, reason", [
    ({"ha": False, "_ha_interface": None}, "not an HA router"),
    ({"ha": False, "distributed": True, "_ha_interface": None}, "DVR-only"),
    ({"_ha_interface": None}, "no HA port on this node"),
])
def test_routers_it_cannot_protect_are_ignored_with_a_log_line(
        extension, agent_conf, caplog, changes, reason):
    with caplog.at_level(logging.INFO, logger="snat_sync.neutron_extension"):
        extension.add_router(None, router(**changes))
    assert inbox(agent_conf) == {}
    assert reason in caplog.text and ROUTER_ID in caplog.text


def agent_in_mode(conf, mode):
    """The extension in an L3 agent whose agent_mode is mode."""
    conf.register_opt(cfg.StrOpt("agent_mode", default="legacy"))
    conf.set_override("agent_mode", mode)
    loaded = load(conf)
    loaded.initialize(None, "ovs")
    return loaded


def test_a_distributed_ha_router_lives_in_its_snat_namespace(agent_conf):
    agent_in_mode(agent_conf, "dvr_snat").add_router(None, router(distributed=True))
    assert inbox(agent_conf)[ROUTER_ID].namespace == f"snat-{ROUTER_ID}"


@pytest.mark.parametrize("mode", ["dvr", "dvr_no_external", "legacy"])
def test_a_distributed_router_is_ignored_where_the_agent_runs_no_keepalived(
        agent_conf, caplog, mode):
    """Even with an HA port in the dict: Neutron builds a DvrLocalRouter there."""
    extension = agent_in_mode(agent_conf, mode)
    with caplog.at_level(logging.INFO, logger="snat_sync.neutron_extension"):
        extension.add_router(None, router(distributed=True))
    assert inbox(agent_conf) == {}
    assert f"agent in mode {mode}" in caplog.text


@pytest.mark.parametrize("mode", ["dvr", "dvr_no_external", "dvr_snat", "legacy"])
def test_a_legacy_ha_router_is_handled_in_every_agent_mode(agent_conf, mode):
    agent_in_mode(agent_conf, mode).add_router(None, router())
    assert inbox(agent_conf)[ROUTER_ID].namespace == f"qrouter-{ROUTER_ID}"


def test_a_distributed_router_handed_over_is_taken_away_on_a_dvr_agent(agent_conf):
    """An agent whose mode changed finds the router's old file and removes it."""
    agent_in_mode(agent_conf, "dvr_snat").add_router(None, router(distributed=True))
    other = cfg.ConfigOpts()
    other([], project="neutron")
    other.register_opts(neutron_extension.OPTS, group=neutron_extension.GROUP)
    other.set_override("state_path", agent_conf.snat_sync.state_path,
                       group=neutron_extension.GROUP)
    agent_in_mode(other, "dvr").update_router(None, router(distributed=True))
    assert inbox(agent_conf) == {}


def test_a_broken_router_dict_is_ignored_not_raised(extension, agent_conf, caplog):
    broken = router()
    broken["_ha_interface"]["fixed_ips"][0]["ip_address"] = "not an address"
    with caplog.at_level(logging.INFO, logger="snat_sync.neutron_extension"):
        extension.add_router(None, broken)
        extension.add_router(None, router(ha_vr_id=None))
    assert inbox(agent_conf) == {}
    assert "cannot derive its spec" in caplog.text


def test_refuses_to_run_beside_neutrons_own_conntrackd(agent_conf):
    agent_conf.register_opt(cfg.BoolOpt("ha_conntrackd_enabled", default=False))
    agent_conf.set_override("ha_conntrackd_enabled", True)
    with pytest.raises(ConntrackdConflict, match="ha_conntrackd_enabled"):
        load(agent_conf).initialize(None, "ovs")


def test_runs_when_neutrons_conntrackd_is_off(agent_conf):
    agent_conf.register_opt(cfg.BoolOpt("ha_conntrackd_enabled", default=False))
    load(agent_conf).initialize(None, "ovs")


@pytest.mark.parametrize("vrid, cidrs, expected", [
    (7, ["169.254.192.0/18"], "169.254.0.7/24"),
    (254, ["169.254.192.0/18"], "169.254.0.254/24"),
    (3, ["169.254.0.0/24"], "169.254.1.3/24"),
    (3, ["169.254.0.0/18"], "169.254.128.3/24"),
])
def test_primary_address_is_the_one_neutrons_keepalived_uses(vrid, cidrs, expected):
    assert neutron_extension.primary_address(vrid, cidrs) == ipaddress.ip_interface(
        expected)


def test_a_router_that_stops_being_ha_here_is_taken_away(extension, agent_conf):
    extension.add_router(None, router())

    extension.update_router(None, router(ha=False, _ha_interface=None))

    assert inbox(agent_conf) == {}
