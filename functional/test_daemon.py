"""`snat-sync daemon` on both nodes of the lab: crash recovery and the role watcher.

Each node runs its own daemon over its own state path, in the root namespace (it only
enters the router namespaces by name); each is stopped by pid however the test ends.
"""

import contextlib
import json
import os
import signal
import subprocess
import time

from snat_sync.lab import demo
from snat_sync.lab import flows
from snat_sync.lab import topology as lab_module

PRIMARY_ADDRESS = "169.254.0.{vrid}/24"


def add_router(lab, router, state_path, primary_address=None):
    """`snat-sync router add` on router's node, optionally with its primary address."""
    arguments = [
        "router", "add", lab.router_id, "--namespace", router.namespace,
        "--ha-interface", router.ha.device, "--local-address", router.ha_address,
        "--peer-address", router.peer_ha_address, "--vrid", lab.vrid, "--json",
    ]
    if primary_address:
        arguments += ["--primary-address", primary_address]
    lab_module.snat_sync(state_path, *arguments)
    return state_path / "routers" / lab.router_id


@contextlib.contextmanager
def running_daemon(state_path, log_path, *global_arguments):
    """`snat-sync daemon` on a node; global_arguments (--config-file F) go first.

    Without a --config-file of its own it runs on the lab's sandbox config for the
    state path, as `router add` through the lab did: never the host's config, and
    metrics on an ephemeral port, never the node's 9787.
    """
    process = subprocess.Popen(
        lab_module.snat_sync_argv(state_path, *global_arguments, "daemon",
                                  "--workers", 2),
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
        env=lab_module.package_environment(), start_new_session=True)
    try:
        yield process
    finally:
        lab_module.stop_process(process, timeout=10)


def conntrackd_pid(router):
    pids = [process.pid for process in
            lab_module.named_processes_in_namespace(router.namespace, "conntrackd")]
    return pids[0] if len(pids) == 1 else None


def flow_entries(lines):
    """Listing lines (kernel or conntrackd cache) of the flows' connections (to
    the flow server's port)."""
    return {line.split()[0] + " " + " ".join(sorted(
        f"{key}={value}" for key, value in lab_module.conntrack_tuples(line)[0].items()))
        for line in lines if f"dport={flows.DEFAULT_PORT}" in line}


def test_daemon_restores_a_killed_conntrackd_and_the_failover_keeps_every_flow(
        lab, state_paths, tmp_path):
    r1, r2 = lab.routers
    directories = {router.name: add_router(lab, router, state_paths[router.name])
                   for router in lab.routers}
    configs = {name: directory / "conntrackd.conf"
               for name, directory in directories.items()}
    settings = demo.ScenarioSettings(crash_after=12.0, run_after_crash=10.0)
    with contextlib.ExitStack() as stack:
        for router in lab.routers:
            stack.enter_context(running_daemon(state_paths[router.name],
                                               tmp_path / f"daemon-{router.name}.log"))
        demo.start_keepalived_pair(
            lab, {name: str(directory / "notify.sh")
                  for name, directory in directories.items()},
            state_paths, settings.advert_int)
        server = demo.start_server(lab, tmp_path, settings.client_duration + 10)
        client = demo.start_client(lab, tmp_path, settings)
        started = time.monotonic()

        def backup_replica():
            # warm standby (the default): the backup's replica is its kernel table
            return flow_entries(lab_module.kernel_entries(r2))

        expected = 2 * settings.flows
        assert lab_module.wait_until(lambda: len(backup_replica()) >= expected, 5), (
            backup_replica())
        before = backup_replica()

        old_pid = conntrackd_pid(r1)
        os.kill(old_pid, signal.SIGKILL)
        restarted = lab_module.wait_until(
            lambda: (pid := conntrackd_pid(r1)) not in (None, old_pid) and pid, 5)
        assert restarted, lab_module.read_tail(tmp_path / "daemon-r1.log")

        def primary_cache_refilled():
            return flow_entries(lab_module.conntrackd_cache(r1, configs["r1"],
                                                            "internal")) >= before

        assert lab_module.wait_until(primary_cache_refilled, 5), (
            "the restarted conntrackd did not resync from the kernel: "
            + lab_module.read_tail(tmp_path / "daemon-r1.log"))
        assert lab_module.wait_until(lambda: backup_replica() >= before, 5), (
            "the backup's replica is not full again after the restore")

        remaining = settings.crash_after - (time.monotonic() - started)
        assert remaining > 1, "the restore took too long for the scenario's timing"
        time.sleep(remaining)
        crash_primary_and_finish(lab, client, server, tmp_path, settings,
                                 state_paths["r2"])

    results, broken = flow_results(tmp_path)
    assert not broken, broken
    assert len(results) == 2 * settings.flows


def crash_primary_and_finish(lab, client, server, tmp_path, settings, new_primary):
    """Crash r1, let the flows run out, and wait for r2's primary transition."""
    demo.crash_primary(lab)
    demo.wait_for_exit(client, tmp_path / "client.log", settings.run_after_crash + 20)
    demo.stop_server(server, tmp_path / "server.log")
    demo.wait_for_role(new_primary, lab.router_id, "primary")


def flow_results(tmp_path):
    """Every flow's merged report, and those lost or seen from another endpoint."""
    results = flows.merge_reports(
        json.loads((tmp_path / "client.json").read_text()),
        json.loads((tmp_path / "server.json").read_text()))
    return results, [result for result in results
                     if not (result.alive and result.same_public_endpoint)]


def start_neutron_style_keepalived(lab, router, primary, advert_int):
    """keepalived as Neutron configures it: no notify line, and the primary address
    first in virtual_ipaddress, on the HA interface."""
    config = lab_module.keepalived_config(lab, router, None, advert_int).replace(
        "    virtual_ipaddress {\n",
        f"    virtual_ipaddress {{\n        {primary} dev {router.ha.device}\n", 1)
    directory = lab_module.keepalived_directory(lab, router)
    (directory / "keepalived.conf").write_text(config)
    router.keepalived = lab_module.start_process(
        lab, router.namespace,
        ["keepalived", "--vrrp", "--dont-fork", "--log-console", "--log-detail",
         "--no-syslog", "--use-file", directory / "keepalived.conf",
         "--pid", directory / "keepalived.pid", "--vrrp_pid", directory / "vrrp.pid",
         "--checkers_pid", directory / "checkers.pid"],
        directory / "keepalived.log")


def test_neutron_style_failover_driven_by_the_watcher_keeps_every_flow(
        lab, state_paths, tmp_path):
    """Routers handed over as the Neutron extension does (peers unknown: multicast),
    keepalived without notify: the daemons' address watchers run every transition."""
    primary = PRIMARY_ADDRESS.format(vrid=lab.vrid)
    for router in lab.routers:
        inbox = state_paths[router.name] / "neutron"
        inbox.mkdir(parents=True, mode=0o700)
        (inbox / f"{lab.router_id}.json").write_text(json.dumps({
            "router": lab.router_id, "namespace": router.namespace,
            "ha_interface": router.ha.device, "local_address": router.ha_address,
            "peer_addresses": [], "vrid": lab.vrid, "primary_address": primary}))
    settings = demo.ScenarioSettings()
    with contextlib.ExitStack() as stack:
        for router in lab.routers:
            stack.enter_context(running_daemon(state_paths[router.name],
                                               tmp_path / f"daemon-{router.name}.log"))
        for router in lab.routers:  # added, and taken into the backup role
            spec = state_paths[router.name] / "routers" / lab.router_id / "spec.json"
            assert lab_module.wait_until(spec.exists, 10)
            demo.wait_for_role(state_paths[router.name], lab.router_id, "backup")
        for router in lab.routers:
            start_neutron_style_keepalived(lab, router, primary, settings.advert_int)
        lab_module.wait_for_primary(lab, lab.routers[0])
        demo.wait_for_role(state_paths["r1"], lab.router_id, "primary")
        server = demo.start_server(lab, tmp_path, settings.client_duration + 10)
        client = demo.start_client(lab, tmp_path, settings)
        time.sleep(settings.crash_after)
        crash_primary_and_finish(lab, client, server, tmp_path, settings,
                                 state_paths["r2"])

    results, broken = flow_results(tmp_path)
    assert not broken, (broken, lab_module.read_tail(tmp_path / "daemon-r2.log"))
    assert len(results) == 2 * settings.flows


def test_watcher_runs_the_transition_when_the_primary_address_moves(
        lab, state_paths, tmp_path):
    """No keepalived and no notify hook: only the address on the HA interface."""
    r1 = lab.routers[0]
    primary = PRIMARY_ADDRESS.format(vrid=lab.vrid)
    directory = add_router(lab, r1, state_paths["r1"], primary)
    record_path = directory / "last-transition.json"

    def record():
        try:
            return json.loads(record_path.read_text())
        except (OSError, ValueError):
            return {}

    with running_daemon(state_paths["r1"], tmp_path / "daemon.log"):
        time.sleep(1.0)  # the daemon has started its watcher
        lab_module.ip("addr", "add", primary, "dev", r1.ha.device,
                      namespace=r1.namespace)
        assert lab_module.wait_until(
            lambda: record().get("role") == "primary"
            and record().get("outcome") == "done", 10), (
            record(), lab_module.read_tail(tmp_path / "daemon.log"))
        arrived = record()["arrived"]

        # keepalived's own notify, arriving later, finds the work done.
        lab_module.snat_sync(state_paths["r1"], "notify", lab.router_id, "--arrived",
                             str(time.time()), "INSTANCE", "VR_1", "MASTER", "100")
        assert record()["arrived"] == arrived

        lab_module.ip("addr", "del", primary, "dev", r1.ha.device,
                      namespace=r1.namespace)
        assert lab_module.wait_until(
            lambda: record().get("role") == "backup"
            and record().get("outcome") == "done", 10), (
            record(), lab_module.read_tail(tmp_path / "daemon.log"))


def test_reload_and_stop_leave_an_unchanged_conntrackd_running(lab, state_paths,
                                                               tmp_path):
    r1 = lab.routers[0]
    add_router(lab, r1, state_paths["r1"])
    pid = conntrackd_pid(r1)
    log = tmp_path / "daemon.log"
    with running_daemon(state_paths["r1"], log) as daemon:
        time.sleep(1.0)
        daemon.send_signal(signal.SIGHUP)
        assert lab_module.wait_until(
            lambda: f"router {lab.router_id}: add" in lab_module.read_tail(log), 5)
        time.sleep(1.0)
    assert conntrackd_pid(r1) == pid, lab_module.read_tail(log)
    assert "left running" in lab_module.read_tail(log)
