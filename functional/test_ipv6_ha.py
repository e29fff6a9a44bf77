"""Replication over an HA network with IPv6 addresses only, by UDP and by
multicast (about 9 s each).

The lab's HA legs carry fd00:ca5e::1 and ::2 and no IPv4 address. The negative
control is part of each test: while r2 drops IPv6 datagrams to the router's sync
port, an entry added on r1 never reaches r2; once the drop is gone, the next one
does.
"""

import pytest

from snat_sync import conntrackd
from snat_sync.lab import topology as lab_module

BLOCKED = lab_module.SnatEntry("tcp", "192.168.100.11", 40001, 40001)
PASSED = lab_module.SnatEntry("udp", "192.168.100.12", 40002, 52002)
CONTROL_WAIT = 3.0


def block_rules(port):
    return ("table inet ha_block {\n\tchain input {\n"
            "\t\ttype filter hook input priority filter; policy accept;\n"
            f"\t\tmeta nfproto ipv6 udp dport {port} drop\n\t}}\n}}\n")


def in_kernel(router, entry):
    return any(entry.matches(line) for line in lab_module.kernel_entries(router))


@pytest.mark.parametrize("transport", ["udp", "multicast"])
def test_entries_replicate_over_ipv6_ha_addresses(tmp_path, transport):
    config = tmp_path / "ha6.conf"
    config.write_text(f"[conntrackd]\ntransport = {transport}\n"
                      "[metrics]\nlisten_port = 0\n")
    config.chmod(0o600)
    with lab_module.running_lab(tmp_path / "lab",
                                variant=lab_module.Variant(ha_ipv6=True)) as lab:
        r1, r2 = lab.routers
        registrations = [
            lab_module.snat_sync_router_add(lab, router, tmp_path / router.name,
                                            "--config-file", config)
            for router in lab.routers]
        # As keepalived would: r1 primary, r2 backup (only a primary's conntrackd
        # reads the conntrack events it sends).
        for registration, router, state in zip(registrations, lab.routers,
                                               ("MASTER", "BACKUP")):
            lab_module.run([registration.notify_command, "INSTANCE", "VR_1", state,
                            "100"], namespace=router.namespace)
        rendered = registrations[0].conntrackd_config.read_text()
        log_file = next(line.split()[1] for line in rendered.splitlines()
                        if line.strip().startswith("LogFile"))
        if transport == "udp":
            assert f"IPv6_Destination_Address {r1.peer_ha_address}" in rendered
        else:
            assert "IPv6_address ff12::3780" in rendered
        port = 3780 + lab.vrid
        rules = tmp_path / "block.nft"
        rules.write_text(block_rules(port))
        lab_module.run(["nft", "-f", str(rules)], namespace=r2.namespace)

        lab_module.insert_entry(r1, BLOCKED)
        assert not lab_module.wait_until(lambda: in_kernel(r2, BLOCKED),
                                         timeout=CONTROL_WAIT, interval=0.2), (
            "the entry reached r2 while its IPv6 sync port was blocked")

        lab_module.run(["nft", "delete", "table", "inet", "ha_block"],
                       namespace=r2.namespace)
        lab_module.insert_entry(r1, PASSED)
        assert lab_module.wait_until(lambda: in_kernel(r2, PASSED), timeout=10,
                                     interval=0.2), lab_module.kernel_entries(r2)
        # The one expected warning: conntrackd may not make itself real-time
        # (conntrackd.start_prefix).
        complaints = [line for line in open(log_file).read().splitlines()
                      if ("[warning]" in line or "[ERROR]" in line)
                      and conntrackd.SCHEDULER_REFUSED not in line]
        assert not complaints, complaints
