"""conntrackd started by `snat-sync router add` replicates r1's table to r2.

In warm standby (the default) r2's conntrackd puts every replicated entry straight
into r2's kernel table, NAT mapping and all; in cold standby it keeps them in its
external cache, and only a commit puts them into the kernel.
"""

import json

from snat_sync.lab import topology as lab_module

ENTRIES = (
    lab_module.SnatEntry("tcp", "192.168.100.11", 40001, 40001),
    lab_module.SnatEntry("tcp", "192.168.100.12", 40001, 52001),
    lab_module.SnatEntry("udp", "192.168.100.13", 40002, 52002),
)


def test_router_add_starts_conntrackd(lab, add_router):
    for router in lab.routers:
        registration = add_router(router)
        assert registration.router == lab.router_id
        assert registration.namespace == router.namespace
        assert registration.conntrackd_config.is_file()
        assert lab_module.named_processes_in_namespace(router.namespace, "conntrackd")


def cold_config(tmp_path):
    config = tmp_path / "cold.conf"
    config.write_text("[failover]\nstandby_mode = cold\n[metrics]\nlisten_port = 0\n")
    config.chmod(0o600)
    return config


def in_kernel(router):
    """Whether router's kernel table holds every entry, public port included."""
    kernel = lab_module.kernel_entries(router)
    return all(any(entry.matches(line) for line in kernel) for entry in ENTRIES)


def test_entries_replicate_with_their_nat_mapping_into_the_kernel(
        lab, state_paths):
    """Warm standby: the replica is r2's kernel table, with the NAT mapping. The
    hooks run as keepalived runs them: r1 primary, r2 backup (a backup's
    conntrackd reads no events, so until r1 is told it is primary nothing is sent)."""
    r1, r2 = lab.routers
    hooks = {router.name: lab_module.snat_sync_router_add(
        lab, router, state_paths[router.name]).notify_command
        for router in lab.routers}
    for router, state in ((r2, "BACKUP"), (r1, "MASTER")):
        lab_module.run([hooks[router.name], "INSTANCE", "VR_1", state, "100"],
                       namespace=router.namespace)

    for entry in ENTRIES:
        lab_module.insert_entry(r1, entry)

    assert lab_module.wait_until(lambda: in_kernel(r2), timeout=10, interval=0.2), (
        lab_module.kernel_entries(r2))
    status = lab_module.snat_sync_status(state_paths["r2"], lab.router_id)[0]
    assert status["standby_mode"] == "warm", status
    # the replica's count in status (replica_entries needs a role and the
    # daemon's check, neither of which runs here)
    assert status["kernel_entries"] >= len(ENTRIES), status


def test_entries_replicate_with_their_nat_mapping_through_a_commit(
        lab, state_paths, tmp_path):
    """Cold standby: the replica waits in r2's external cache, not in its kernel,
    and a commit puts it there with the NAT mapping."""
    r1, r2 = lab.routers
    config = cold_config(tmp_path)
    peer = None
    for router in lab.routers:
        peer = lab_module.snat_sync_router_add(lab, router, state_paths[router.name],
                                               "--config-file", config)

    for entry in ENTRIES:
        lab_module.insert_entry(r1, entry)

    def replicated():
        lines = lab_module.conntrackd_cache(r2, peer.conntrackd_config, "external")
        return all(
            any(entry.matches_original(line) for line in lines) for entry in ENTRIES
        )

    assert lab_module.wait_until(replicated, timeout=10, interval=0.2), (
        lab_module.conntrackd_cache(r2, peer.conntrackd_config, "external")
    )
    status = lab_module.snat_sync(state_paths["r2"], "--config-file", config,
                                  "status", lab.router_id, "--json")
    status = json.loads(status.stdout)[0]
    assert status["standby_mode"] == "cold", status
    assert status["external_cache"] >= len(ENTRIES)
    kernel = lab_module.kernel_entries(r2)
    assert not any(
        entry.matches_original(line) for entry in ENTRIES for line in kernel
    ), "a cold backup keeps replicated entries in its external cache, not in its kernel"

    lab_module.commit_external_cache(r2, peer.conntrackd_config)

    kernel = lab_module.kernel_entries(r2)
    for entry in ENTRIES:
        assert any(entry.matches(line) for line in kernel), (entry, kernel)
