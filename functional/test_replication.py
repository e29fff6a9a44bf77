"""conntrackd started by `snat-sync router add` replicates r1's table to r2."""

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


def test_entries_replicate_with_their_nat_mapping(lab, add_router, state_paths):
    r1, r2 = lab.routers
    add_router(r1)
    peer = add_router(r2)

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
    status = lab_module.snat_sync_status(state_paths["r2"], lab.router_id)[0]
    assert status["external_cache"] >= len(ENTRIES)
    kernel = lab_module.kernel_entries(r2)
    assert not any(
        entry.matches_original(line) for entry in ENTRIES for line in kernel
    ), "a backup keeps replicated entries in its external cache, not in its kernel"

    lab_module.commit_external_cache(r2, peer.conntrackd_config)

    kernel = lab_module.kernel_entries(r2)
    for entry in ENTRIES:
        assert any(entry.matches(line) for line in kernel), (entry, kernel)
