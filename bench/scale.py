"""Benchmark: one `snat-sync daemon` managing hundreds of routers on one node.

Builds N router namespaces (each with a veth pair on its HA network; nothing in the
root namespace), hands the N router specs to the daemon the way the Neutron
extension does (one file each under <state>/neutron/), and measures:
  bring-up      daemon start -> every router's conntrackd answering (and then
                every router's first transition done: backup, from its watcher)
  memory        the daemon's RSS; each conntrackd's RSS
  idle CPU      the daemon's CPU time over an idle period, in % of one core
  watcher       primary address added in half the namespaces -> every primary
                transition done (the netlink watcher is the only trigger)
  recovery      SIGKILL of every conntrackd -> every one restarted, answering and
                its state restored (primaries resync from the kernel and bulk-send,
                backups ask for a resync)
  baseline      the daemon stopped and every conntrackd killed: the same N
                conntrackd started directly (`ip netns exec ... conntrackd -d`),
                as many at a time as the daemon has workers
Root; everything it builds is removed at the end, also on failure.

    python3 bench/scale.py [--routers 250] [--workers 8] [--idle 30]
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
HA_ADDRESS = "169.254.192.1"
HA_PREFIXLEN = 18
STARTED = re.compile(r"router (\S+): .*conntrackd started")
RESTARTED = re.compile(r"router (\S+): conntrackd was not running; started it")
RESTORED = re.compile(r"router (\S+): restored conntrackd state as (primary|backup)")
RESTORED_PRIMARY = re.compile(r"router (\S+): restored conntrackd state as primary")


def sh(*command):
    subprocess.run(command, check=True, capture_output=True)


def build_namespace(name):
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "add", "ha0", "type", "veth", "peer", "name", "ha1")
    sh("ip", "-n", name, "address", "add", f"{HA_ADDRESS}/{HA_PREFIXLEN}", "dev", "ha0")
    sh("ip", "-n", name, "link", "set", "ha0", "up")
    sh("ip", "-n", name, "link", "set", "ha1", "up")
    sh("ip", "-n", name, "link", "set", "lo", "up")


def router_spec(index, namespace):
    vrid = index % 254 + 1
    return {"router": f"bench-{index:03d}", "namespace": namespace,
            "ha_interface": "ha0", "local_address": HA_ADDRESS, "peer_addresses": [],
            "vrid": vrid, "primary_address": f"169.254.0.{vrid}/24"}


def conntrackd_processes(state_path):
    """Live conntrackd processes whose config lies under state_path."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (process.info["name"] == "conntrackd"
                    and any(str(state_path) in part
                            for part in process.info["cmdline"] or [])
                    and process.status() != psutil.STATUS_ZOMBIE):
                found.append(process)
    return found


def log_times(log_path, pattern, since):
    """{router: first time (epoch) a log line matched pattern after since}."""
    times = {}
    for line in pathlib.Path(log_path).read_text(errors="replace").splitlines():
        match = pattern.search(line)
        if not match:
            continue
        stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(
            line[20:23]) / 1000
        if stamp >= since and match.group(1) not in times:
            times[match.group(1)] = stamp
    return times


def wait_for(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def cpu_seconds(process):
    times = process.cpu_times()
    return times.user + times.system


def transitions_done(state_path, routers, role):
    done = 0
    for router in routers:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((state_path / "routers" / router
                                 / "last-transition.json").read_text())
            done += record["role"] == role and record["outcome"] in (
                "done", "failed")
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", type=int, default=250)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--check-interval", type=float, default=3.0,
                        help="[health] check_interval of the daemon (its health "
                        "checks are most of its CPU time once the routers run)")
    arguments = parser.parse_args()
    count = arguments.routers
    prefix = f"ssb-{secrets.token_hex(3)}"
    namespaces = [f"{prefix}-{index:03d}" for index in range(count)]
    state_path = pathlib.Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    log_path = state_path.parent / f"{state_path.name}.log"
    built, daemon = [], None
    results = {"routers": count, "workers": arguments.workers,
               "check_interval": arguments.check_interval}
    try:
        clock = time.monotonic()
        for namespace in namespaces:
            build_namespace(namespace)
            built.append(namespace)
        print(f"{count} namespaces built in {time.monotonic() - clock:.1f} s",
              flush=True)
        inbox = state_path / "neutron"
        inbox.mkdir(mode=0o700)
        for index, namespace in enumerate(namespaces):
            spec = router_spec(index, namespace)
            (inbox / f"{spec['router']}.json").write_text(json.dumps(spec))
        routers = [f"bench-{index:03d}" for index in range(count)]

        # -- bring-up ---------------------------------------------------------------
        started = time.time()
        environment = dict(os.environ, PYTHONPATH=str(ROOT))
        config = state_path / "snat-sync.conf"
        config.write_text(f"[health]\ncheck_interval = {arguments.check_interval}\n"
                          "[metrics]\nlisten_port = 0\n")
        config.chmod(0o600)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "snat_sync", "--config-file", str(config),
             "--state-path", str(state_path),
             "daemon", "--workers", str(arguments.workers)],
            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=environment,
            start_new_session=True)
        daemon_process = psutil.Process(daemon.pid)
        up = wait_for(lambda: len(log_times(log_path, STARTED, started)) >= count,
                      300, interval=0.5)
        times = log_times(log_path, STARTED, started)
        if not up:
            raise SystemExit(f"only {len(times)} of {count} routers came up; "
                             f"see {log_path}")
        results["bring_up_s"] = round(max(times.values()) - started, 2)
        print(f"all {count} up in {results['bring_up_s']} s", flush=True)

        # Each watcher, once started, takes its router into the role its address
        # shows: backup for all of them here. Idle means after that.
        settled = wait_for(lambda: transitions_done(state_path, routers, "backup")
                           >= count, 120, interval=0.5)
        results["first_transitions_s"] = round(time.time() - started, 2)
        if not settled:
            raise SystemExit("the routers' first (backup) transitions did not all run")
        time.sleep(2)

        # -- memory and idle CPU ----------------------------------------------------
        processes = conntrackd_processes(state_path)
        rss = [process.memory_info().rss / 2**20 for process in processes]
        results["conntrackd_count"] = len(processes)
        results["conntrackd_rss_mb"] = {
            "mean": round(statistics.mean(rss), 2), "max": round(max(rss), 2),
            "total": round(sum(rss), 1)}
        results["daemon_rss_mb"] = round(daemon_process.memory_info().rss / 2**20, 1)
        results["daemon_threads"] = daemon_process.num_threads()
        results["daemon_fds"] = daemon_process.num_fds()
        before = cpu_seconds(daemon_process)
        time.sleep(arguments.idle)
        results["daemon_idle_cpu_percent"] = round(
            100 * (cpu_seconds(daemon_process) - before) / arguments.idle, 2)
        print(f"daemon RSS {results['daemon_rss_mb']} MB, idle CPU "
              f"{results['daemon_idle_cpu_percent']} %; conntrackd RSS "
              f"{results['conntrackd_rss_mb']}", flush=True)

        # -- the watcher: half the routers become primary -----------------------------
        primaries = routers[::2]
        clock = time.monotonic()
        for index in range(0, count, 2):
            spec = router_spec(index, namespaces[index])
            sh("ip", "-n", namespaces[index], "address", "add",
               spec["primary_address"], "dev", "ha0")
        done = wait_for(lambda: transitions_done(state_path, primaries, "primary")
                        >= len(primaries), 120, interval=0.2)
        results["watcher_primary_transitions_s"] = round(time.monotonic() - clock, 2)
        if not done:
            raise SystemExit(f"only {transitions_done(state_path, primaries, 'primary')}"
                             f" of {len(primaries)} primary transitions ran")
        print(f"{len(primaries)} primary transitions by the watcher in "
              f"{results['watcher_primary_transitions_s']} s", flush=True)
        time.sleep(2)

        # -- mass kill and recovery ---------------------------------------------------
        victims = conntrackd_processes(state_path)
        killed = time.time()
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.kill()
        recovered = wait_for(
            lambda: len(log_times(log_path, RESTORED, killed)) >= count, 120,
            interval=0.5)
        restarted = log_times(log_path, RESTARTED, killed)
        restored = log_times(log_path, RESTORED, killed)
        if not recovered:
            raise SystemExit(f"only {len(restarted)} of {count} restarted, "
                             f"{len(restored)} restored; see {log_path}")
        results["recovery_restarted_s"] = round(max(restarted.values()) - killed, 2)
        results["recovery_s"] = round(max(restored.values()) - killed, 2)
        primaries_restored = len(log_times(log_path, RESTORED_PRIMARY, killed))
        results["recovery_restored_primaries"] = primaries_restored
        print(f"all {count} restarted in {results['recovery_restarted_s']} s, "
              f"state restored in {results['recovery_s']} s ({primaries_restored} "
              f"primaries: -R then -B; the others backups: -n)", flush=True)

        # -- baseline: the same conntrackd started without snat-sync -------------------
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        daemon = None
        victims = conntrackd_processes(state_path)
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.kill()
        wait_for(lambda: not conntrackd_processes(state_path), 30)
        for router in routers:
            for name in ("conntrackd.lock", "conntrackd.ctl"):
                with contextlib.suppress(FileNotFoundError):
                    (state_path / "routers" / router / name).unlink()
        clock = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(arguments.workers) as pool:
            list(pool.map(lambda pair: sh(
                "ip", "netns", "exec", pair[0], "conntrackd", "-C",
                str(state_path / "routers" / pair[1] / "conntrackd.conf"), "-d"),
                zip(namespaces, routers)))
        results["baseline_raw_start_s"] = round(time.monotonic() - clock, 2)
        print(f"baseline: the {count} conntrackd started directly, {arguments.workers} "
              f"at a time, in {results['baseline_raw_start_s']} s", flush=True)
        print(json.dumps(results, indent=2))
        log_path.unlink()
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for process in conntrackd_processes(state_path):
            with contextlib.suppress(psutil.Error):
                process.kill()
        for namespace in built:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        shutil.rmtree(state_path, ignore_errors=True)
        if log_path.exists():
            print(f"daemon log kept in {log_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
