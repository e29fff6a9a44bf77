"""Health reports of routers without a peer list (Neutron's): by multicast on the
HA network, peers learned from them, so status and `snat-sync wait` say in-sync.

Both lab routers (IPv4 HA addresses, and IPv6 ones) are handed over as the
Neutron extension does (no peers, the primary address), each node's daemon
checks every second, and r1 takes the primary address as keepalived would. The
primary is loaded with idle entries that the backup must hold. Negative
control: while r2's namespace drops the report port, r2 hears no report, so its
status names the primary's silent daemon and `wait` times out; once the reports
pass, both nodes are in sync with the other node, and only it, as their one
peer. (Without multicast reports, the code before them, the final wait fails:
"no report from any peer's daemon".)
"""

import contextlib
import json
import subprocess

import pytest

from snat_sync import reports
from snat_sync.lab import demo
from snat_sync.lab import topology as lab_module

from functional.test_daemon import PRIMARY_ADDRESS, running_daemon

ENTRIES = 2000


def write_config(path):
    path.write_text("[health]\ncheck_interval = 1\n[metrics]\nlisten_port = 0\n")
    path.chmod(0o600)
    return path


def hand_over(lab, router, state_path, primary):
    """The router's spec in the daemon's Neutron inbox, as the extension writes it."""
    inbox = state_path / "neutron"
    inbox.mkdir(parents=True, mode=0o700)
    (inbox / f"{lab.router_id}.json").write_text(json.dumps({
        "router": lab.router_id, "namespace": router.namespace,
        "ha_interface": router.ha.device, "local_address": router.ha_address,
        "peer_addresses": [], "vrid": lab.vrid, "primary_address": primary}))


def status(state_path, config, router_id):
    result = lab_module.snat_sync(state_path, "--config-file", config, "status",
                                  router_id, "--json")
    return json.loads(result.stdout)[0]


def wait(state_path, config, router_id, timeout):
    return subprocess.run(
        lab_module.snat_sync_argv(state_path, "--config-file", config, "wait",
                                  router_id, "--timeout", str(timeout)),
        capture_output=True, text=True, timeout=timeout + 30,
        env=lab_module.package_environment())


@pytest.fixture(params=["ipv4", "ipv6"])
def family_lab(request, tmp_path):
    """The lab with IPv4 HA addresses (Neutron's), or IPv6 ones (ff12::3780)."""
    variant = lab_module.Variant(ha_ipv6=request.param == "ipv6")
    with lab_module.running_lab(tmp_path / "lab", variant=variant) as built:
        primary = (PRIMARY_ADDRESS.format(vrid=built.vrid) if request.param == "ipv4"
                   else f"fd00:ca5f::{built.vrid}/64")
        yield built, primary


def test_routers_without_peers_reach_in_sync_by_multicast_reports(
        family_lab, state_paths, tmp_path):
    lab, primary = family_lab
    r1, r2 = lab.routers
    configs = {router.name: write_config(tmp_path / f"{router.name}.conf")
               for router in lab.routers}
    for router in lab.routers:
        hand_over(lab, router, state_paths[router.name], primary)
    port = str(reports.report_port(4780, lab.vrid))  # [health] base_port default
    drop = ["-p", "udp", "--dport", port, "-j", "DROP"]
    firewall = "ip6tables" if ":" in r2.ha_address else "iptables"
    lab_module.run([firewall, "-I", "INPUT", *drop], namespace=r2.namespace)
    with contextlib.ExitStack() as stack:
        for router in lab.routers:
            stack.enter_context(running_daemon(
                state_paths[router.name], tmp_path / f"daemon-{router.name}.log",
                "--config-file", configs[router.name]))
        for router in lab.routers:  # added, and taken into the backup role
            spec = state_paths[router.name] / "routers" / lab.router_id / "spec.json"
            assert lab_module.wait_until(spec.exists, 10)
            demo.wait_for_role(state_paths[router.name], lab.router_id, "backup")
        lab_module.ip("addr", "add", primary, "dev", r1.ha.device,
                      namespace=r1.namespace)
        demo.wait_for_role(state_paths["r1"], lab.router_id, "primary")
        assert lab_module.load_idle_entries(r1, ENTRIES, tmp_path) == ENTRIES

        blocked = wait(state_paths["r2"], configs["r2"], lab.router_id, 3)
        assert blocked.returncode == 1, blocked
        assert "no report from the primary's daemon" in blocked.stdout, blocked.stdout

        lab_module.run([firewall, "-D", "INPUT", *drop], namespace=r2.namespace)
        for router in lab.routers:
            done = wait(state_paths[router.name], configs[router.name],
                        lab.router_id, 15)
            assert done.returncode == 0, (
                router.name, done.stdout,
                lab_module.read_tail(tmp_path / f"daemon-{router.name}.log"))

        for router, role, peer_role in ((r1, "primary", "backup"),
                                        (r2, "backup", "primary")):
            found = status(state_paths[router.name], configs[router.name],
                           lab.router_id)
            assert (found["role"], found["verdict"]) == (role, "in-sync"), found
            assert [(peer["address"], peer["role"]) for peer in found["peers"]] == [
                (router.peer_ha_address, peer_role)], found["peers"]
            assert found["primary_entries"] >= ENTRIES, found
        assert found["replica_entries"] >= ENTRIES, found  # r2's replica
