"""Lifecycle of a router's conntrackd: stale lock, removal, status after a failover."""

import contextlib
import json
import os
import re
import signal
import threading
import time

import pytest

from snat_sync import conntrackd, statedir
from snat_sync.lab import demo
from snat_sync.lab import topology as lab_module

from functional.test_failover import WARM_TAKEOVER, warm_takeover_steps


def conntrackd_paths(config):
    """LockFile and UNIX socket Path named in a rendered conntrackd.conf."""
    text = config.read_text()
    lock = re.search(r"^\s*LockFile\s+(\S+)", text, re.MULTILINE).group(1)
    socket = re.search(r"^\s*Path\s+(\S+)", text, re.MULTILINE).group(1)
    return lock, socket


def conntrackd_pids(router):
    processes = lab_module.named_processes_in_namespace(router.namespace, "conntrackd")
    return {process.pid for process in processes}


def crash_conntrackd(router, config):
    """kill -9 the router's conntrackd; it leaves its lock file and socket behind."""
    pids = conntrackd_pids(router)
    assert len(pids) == 1, pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert lab_module.wait_until(lambda: not conntrackd_pids(router), timeout=5)
    lock, socket = conntrackd_paths(config)
    assert os.path.exists(lock), "the killed conntrackd should have left its lock file"
    assert os.path.exists(socket), "the killed conntrackd should have left its socket"
    return pids


def test_router_add_recovers_stale_lock(lab, add_router, state_paths):
    r1 = lab.routers[0]
    registration = add_router(r1)
    old = crash_conntrackd(r1, registration.conntrackd_config)

    add_router(r1)

    new = conntrackd_pids(r1)
    assert new and not new & old
    status = lab_module.snat_sync_status(state_paths["r1"], lab.router_id)[0]
    assert status["conntrackd_alive"] and status["conntrackd_pid"] in new


def test_notify_backup_recovers_stale_lock(lab, add_router, state_paths):
    r1 = lab.routers[0]
    registration = add_router(r1)
    old = crash_conntrackd(r1, registration.conntrackd_config)

    lab_module.snat_sync(state_paths["r1"], "notify", lab.router_id, "backup")

    new = conntrackd_pids(r1)
    assert new and not new & old
    status = lab_module.snat_sync_status(state_paths["r1"], lab.router_id)[0]
    assert status["conntrackd_alive"]
    assert status["last_transition"]["role"] == "backup"
    assert status["last_transition"]["outcome"] == "done"


def test_router_remove_leaves_nothing(lab, add_router, state_paths):
    r1 = lab.routers[0]
    registration = add_router(r1)
    lock, socket = conntrackd_paths(registration.conntrackd_config)
    router_directory = registration.conntrackd_config.parent

    lab_module.snat_sync(state_paths["r1"], "router", "remove", lab.router_id)

    assert not conntrackd_pids(r1)
    for path in (registration.conntrackd_config, lock, socket):
        assert not os.path.exists(path), path
    leftovers = sorted(router_directory.rglob("*")) if router_directory.exists() else []
    assert not leftovers, leftovers
    assert not [
        path for path in state_paths["r1"].rglob("*") if lab.router_id in str(path)
    ]


def scheduling_policies_while(router, action):
    """Every scheduling policy router's conntrackd processes had while action ran.

    Sampled every few ms by pid, so the conntrackd that reads the kernel's table
    before it daemonises is seen as well as the daemon it forks.
    """
    seen = set()
    done = threading.Event()

    def sample():
        while not done.is_set():
            for process in lab_module.named_processes_in_namespace(router.namespace,
                                                                   "conntrackd"):
                with contextlib.suppress(OSError):
                    seen.add((process.pid, os.sched_getscheduler(process.pid)))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return seen


def test_conntrackd_reads_a_large_table_at_the_normal_scheduler(lab, add_router,
                                                                 state_paths, tmp_path):
    """conntrackd makes itself real-time (SCHED_RR 99) before it reads the kernel's
    table; snat-sync starts it without the capability, so it never is."""
    r1 = lab.routers[0]
    assert lab_module.load_idle_entries(r1, 100_000, tmp_path) == 100_000

    seen = scheduling_policies_while(r1, lambda: add_router(r1))

    pids = {pid for pid, _ in seen}
    assert len(pids) >= 2, f"expected the starting conntrackd and its daemon: {seen}"
    assert {policy for _, policy in seen} == {os.SCHED_OTHER}, seen
    files = statedir.RouterFiles.under(state_paths["r1"], lab.router_id)
    assert conntrackd.SCHEDULER_REFUSED in files.log_file.read_text()


@pytest.mark.parametrize("standby_mode", ["warm", "cold"])
def test_status_after_failover(lab, state_paths, tmp_path, standby_mode):
    """Warm standby: r2's kernel table holds the replica and the takeover loads
    nothing (no commit). Cold: its external cache does, and the takeover's commit
    is accounted for in the status."""
    r1, r2 = lab.routers
    config = tmp_path / f"{standby_mode}.conf"
    config.write_text(f"[failover]\nstandby_mode = {standby_mode}\n"
                      "[metrics]\nlisten_port = 0\n")
    config.chmod(0o600)
    notify = {router.name: lab_module.snat_sync_router_add(
        lab, router, state_paths[router.name], "--config-file", config).notify_command
        for router in lab.routers}
    demo.start_keepalived_pair(lab, notify, state_paths)
    entries = [
        lab_module.SnatEntry("udp", address, 40001, 50000 + index)
        for index, address in enumerate(lab_module.CLIENT_ADDRESSES)
    ]
    for entry in entries:
        lab_module.insert_entry(r1, entry)

    def status_of(router):
        return json.loads(lab_module.snat_sync(
            state_paths[router.name], "--config-file", config, "status",
            lab.router_id, "--json").stdout)[0]

    def peer_has_them():
        if standby_mode == "cold":
            return (status_of(r2)["external_cache"] or 0) >= len(entries)
        kernel = lab_module.kernel_entries(r2)
        return all(any(entry.matches(line) for line in kernel) for entry in entries)

    assert lab_module.wait_until(peer_has_them, timeout=10, interval=0.2)
    assert status_of(r2)["standby_mode"] == standby_mode

    crashed_at = time.time()
    lab_module.crash_router(lab, r1)
    lab_module.wait_for_primary(lab, r2)
    demo.wait_for_role(state_paths["r2"], lab.router_id, "primary")

    status = status_of(r2)
    transition = status["last_transition"]
    assert status["role"] == "primary"
    assert transition["outcome"] == "done", transition
    assert transition["arrived"] > crashed_at
    steps = {step["name"]: step for step in transition["steps"]}
    if standby_mode == "cold":
        assert transition["commit"]["committed"] >= len(entries), transition
        assert transition["commit"]["failed"] == 0, transition
        assert "commit" in steps, transition
    else:
        assert transition["commit"] is None, transition
        assert warm_takeover_steps(transition) == WARM_TAKEOVER, transition
    for step in transition["steps"]:
        assert step["ok"] and step["duration_ms"] >= 0, step
    kernel = lab_module.kernel_entries(r2)
    for entry in entries:
        assert any(entry.matches(line) for line in kernel), (entry, kernel)
