"""The node daemons repair replication faults by themselves, and only when allowed.

Each test runs the fault twice: with [health] repair on, the replica must be
complete again within seconds; with it off, the same fault must leave it short,
which proves the repair (and nothing else) mended it.

A backup that lost entries on its own side is tested in warm standby (the
default), where the replica is its kernel table; the split brain in cold standby,
where becoming primary flushes the replica (flush-caches), which warm standby,
keeping the replica in the kernel table it then serves from, does not.
"""

import contextlib
import json
import subprocess
import time

import pytest

from snat_sync import conntrackd as conntrackd_module
from snat_sync.lab import demo
from snat_sync.lab import topology as lab_module

from functional.test_daemon import running_daemon

ENTRIES = 2000
REPAIR_WINDOW = 9  # seconds: a check a second, two checks in a row, the resync (2.7 s)


def write_config(path, repair, resync_on_backup=True, standby_mode="warm"):
    path.write_text(
        "[health]\n"
        "check_interval = 1\n"
        f"repair = {str(repair).lower()}\n"
        "repair_backoff = 5\n"
        "[failover]\n"
        f"resync_on_backup = {str(resync_on_backup).lower()}\n"
        f"standby_mode = {standby_mode}\n"
        "[metrics]\n"
        "listen_port = 0\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def nodes_with_daemons(lab, state_paths, tmp_path, configs):
    """Both routers added and each node's daemon running, with its config file;
    yields {router name: registration}. The daemons are stopped on the way out."""
    registrations = {router.name: lab_module.snat_sync_router_add(
        lab, router, state_paths[router.name], "--config-file", configs[router.name])
        for router in lab.routers}
    with contextlib.ExitStack() as stack:
        for router in lab.routers:
            stack.enter_context(running_daemon(
                state_paths[router.name], tmp_path / f"daemon-{router.name}.log",
                "--config-file", configs[router.name]))
        yield registrations


def cache(router, registration):
    result = lab_module.run(
        ["conntrackd", "-C", str(registration.conntrackd_config), "-s", "cache"],
        namespace=router.namespace)
    return conntrackd_module.parse_cache_stats(result.stdout)


def idle_entries_in_kernel(router):
    """How many of the lab's idle entries (clients 10.200.0.x, see
    lab_module.idle_entry) router's kernel table holds: a warm backup's replica."""
    return sum("src=10.200.0." in line for line in lab_module.kernel_entries(router))


def notify(registration, state):
    hook = registration.conntrackd_config.parent / "notify.sh"
    subprocess.run([str(hook), "INSTANCE", "VR_1", state, "100"], check=True,
                   timeout=60)


def wait_until_settled(state_paths, router_id):
    """Wait until each daemon has heard its peer in its final role, and two more
    checks have passed: the primary resyncs once when its peer turns backup, and
    that must not be mistaken for the repair under test."""
    def heard(name, role):
        path = state_paths[name] / "routers" / router_id / "health.json"
        health = json.loads(path.read_text()) if path.exists() else {}
        return any(peer["role"] == role for peer in health.get("peers", []))

    assert lab_module.wait_until(
        lambda: heard("r1", "backup") and heard("r2", "primary"), 15)
    time.sleep(2.5)


def repairs(state_path, router_id):
    path = state_path / "routers" / router_id / "history.jsonl"
    if not path.exists():
        return []
    return [entry for entry in map(json.loads, path.read_text().splitlines())
            if entry.get("kind") == "repair"]


@pytest.mark.parametrize("repair", [True, False], ids=["repair-on", "repair-off"])
def test_a_backup_whose_replica_lost_entries_asks_for_the_whole_table(
        lab, state_paths, tmp_path, repair):
    """A stall FTFW never mends: the backup's replica lost entries on its own side
    (here flushed: in warm standby the replica is the backup's kernel table, so
    `conntrack -F` in its namespace; a node whose table was emptied behind the
    daemon's back is left the same). The primary keeps no record of what the
    backup holds, so it resends nothing."""
    r1, r2 = lab.routers
    configs = {name: write_config(tmp_path / f"{name}.conf", repair)
               for name in ("r1", "r2")}
    with nodes_with_daemons(lab, state_paths, tmp_path, configs) as registrations:
        notify(registrations["r1"], "MASTER")
        notify(registrations["r2"], "BACKUP")
        wait_until_settled(state_paths, lab.router_id)
        loaded = lab_module.load_idle_entries(r1, ENTRIES, tmp_path)
        assert loaded == ENTRIES
        assert lab_module.wait_until(
            lambda: idle_entries_in_kernel(r2) >= ENTRIES, 15)

        lab_module.run(["conntrack", "-F"], namespace=r2.namespace)
        assert idle_entries_in_kernel(r2) < ENTRIES
        flushed = time.monotonic()

        mended = lab_module.wait_until(
            lambda: idle_entries_in_kernel(r2) >= ENTRIES,
            REPAIR_WINDOW, interval=0.2)
        log = lab_module.read_tail(tmp_path / "daemon-r2.log", 4000)
        status = lab_module.snat_sync_status(state_paths["r2"], lab.router_id)[0]
        if repair:
            assert mended, log
            took = time.monotonic() - flushed
            print(f"replica mended {took:.1f} s after the flush")
            assert took < REPAIR_WINDOW
            done = [entry for entry in repairs(state_paths["r2"], lab.router_id)
                    if entry["repair"] == "request-resync"]
            assert done and done[-1]["outcome"] == "done", done
            assert "repair request-resync done" in log
        else:
            assert not mended, "the replica was mended with repair off"
            assert repairs(state_paths["r2"], lab.router_id) == []
            assert "replica-short" in log
            assert any("replica holds" in problem for problem in status["problems"]), (
                status)
            assert status["verdict"] == "degraded"


@pytest.mark.parametrize("repair", [True, False], ids=["repair-on", "repair-off"])
def test_the_survivor_of_a_split_brain_resends_its_table(lab, state_paths, tmp_path,
                                                         repair):
    """Both nodes primary (r2 stops hearing r1's VRRP adverts), then r2 yields.

    Cold standby: as primary r2 flushed its replica (flush-caches); the idle
    entries never change, so FTFW has nothing to send it. The backups' own resync
    request is off here (resync_on_backup = false, and r2 repairs nothing), so only
    the survivor's repair can make r2's replica complete again."""
    r1, r2 = lab.routers
    configs = {"r1": write_config(tmp_path / "r1.conf", repair, False, "cold"),
               "r2": write_config(tmp_path / "r2.conf", False, False, "cold")}
    with nodes_with_daemons(lab, state_paths, tmp_path, configs) as registrations:
        demo.start_keepalived_pair(
            lab, {name: registration.notify_command
                  for name, registration in registrations.items()}, state_paths)
        assert lab_module.load_idle_entries(r1, ENTRIES, tmp_path) == ENTRIES
        assert lab_module.wait_until(
            lambda: cache(r2, registrations["r2"]).external_active >= ENTRIES, 15)
        wait_until_settled(state_paths, lab.router_id)

        drop_vrrp = ["INPUT", "-i", r2.ha.device, "-p", "vrrp", "-j", "DROP"]
        lab_module.run(["iptables", "-A", *drop_vrrp], namespace=r2.namespace)
        demo.wait_for_role(state_paths["r2"], lab.router_id, "primary", timeout=20)
        assert lab_module.has_vip(r1), "r1 should still be primary: a split brain"
        assert lab_module.wait_until(
            lambda: "split-brain" in lab_module.read_tail(
                tmp_path / "daemon-r1.log", 20000), 10), "r1 never saw the split brain"
        assert cache(r2, registrations["r2"]).external_active < ENTRIES

        lab_module.run(["iptables", "-D", *drop_vrrp], namespace=r2.namespace)
        demo.wait_for_role(state_paths["r2"], lab.router_id, "backup", timeout=20)
        assert lab_module.primary(lab) is r1

        mended = lab_module.wait_until(
            lambda: cache(r2, registrations["r2"]).external_active >= ENTRIES,
            REPAIR_WINDOW, interval=0.2)
        log = lab_module.read_tail(tmp_path / "daemon-r1.log", 20000)
        survivor_repairs = [entry for entry in repairs(state_paths["r1"], lab.router_id)
                            if entry["repair"] == "survivor-resync"]
        if repair:
            assert mended, log
            assert survivor_repairs and survivor_repairs[-1]["outcome"] == "done"
            assert [step["name"] for step in survivor_repairs[-1]["steps"]] == [
                "announce-addresses", "resync-from-kernel", "bulk-send"]
        else:
            assert not mended, "r2's replica was complete again with repair off"
            assert survivor_repairs == []
