"""Benchmark: how long a new flow on the primary takes to reach the backup's replica.

For each configuration and rate: a fresh pair of router namespaces joined by one veth
(the HA network). Entries are fed into the primary's kernel at a steady rate in paced batches, one
`conntrack -R FILE` process every 20 ms (`conntrack -R -` from a pipe does not
stream: it inserts nothing before its input ends). A poller
inside the primary's namespace samples, every 1 ms, the primary's nf_conntrack_count
and the size of the backup's replica: in warm standby the backup's kernel table (its
nf_conntrack_count, a file opened inside the backup's namespace), in cold standby
its conntrackd's external cache (one STATS_CACHE request straight to its UNIX
socket, ~0.2 ms). For batch k with cumulative count C_k:
  kernel lag       batch's conntrack started -> primary's kernel count >= C_k
  replication lag  per entry n (every entries/5000-th): primary's kernel count >= n
                   -> backup's replica >= n ("a new flow on the primary appears on
                   the backup"); 0 means within one sample (~1.2 ms)
Lost = entries in the primary's kernel minus entries in the backup's replica once
it has been stable for 2 s (at most 20 s after the feed ends).

Configurations (each measured in the same run, same feed):
  snat-sync     conntrackd as `snat-sync router add` renders and runs it (warm
                standby, the default: into the backup's kernel table), with the
                backup / primary notify transitions run first
  snat-sync-cold  the same with [failover] standby_mode = cold (into the backup's
                external cache)
  defaults      conntrackd at its defaults apart from what it needs to run on this
                pair: FTFW over UDP between the two HA addresses, lock file, socket,
                log file, HA network ignored (no buffer sizes, HashSize, HashLimit,
                Scheduler: so netlink buffer = rmem_default, SCHED_RR 99)

With --pin each node gets a core of its own, as two machines would: the backup's
conntrackd on CPU 1, the primary's conntrackd, the feeder and the poller on CPU 0.
Unpinned, the backup's kernel insertions (warm standby) compete with the feeder's
and the primary's for the same two cores.

    python3 bench/replication_lag.py [--rates 2000,20000,50000,100000,150000] [--seconds 3]
        [--configurations snat-sync,snat-sync-cold,defaults] [--pin]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BATCH_PERIOD = 0.020
MAX_ENTRIES = 200000


def defaults_config(directory, index):
    local, peer = common.HA_ADDRESSES[index], common.HA_ADDRESSES[1 - index]
    return f"""Sync {{
	Mode FTFW {{
	}}
	UDP {{
		IPv4_address {local}
		IPv4_Destination_Address {peer}
		Port 3781
		Interface ha0
	}}
}}
General {{
	LockFile {directory}/lock
	LogFile {directory}/conntrackd.log
	UNIX {{
		Path {directory}/ctl
	}}
	Filter From Kernelspace {{
		Address Ignore {{
			IPv4_address 127.0.0.1
			IPv4_address 169.254.192.0/18
		}}
	}}
}}
"""


WARM = ("snat-sync",)
COLD_CONFIG = "[failover]\nstandby_mode = cold\n"


def start_pair(bench, configuration):
    """Return (r1, r2, (config, socket, log) of the primary, same of the backup)."""
    r1, r2 = bench.router_pair()
    if configuration.startswith("snat-sync"):
        config_file = None
        if configuration == "snat-sync-cold":
            config_file = bench.workdir / "cold.conf"
            config_file.write_text(COLD_CONFIG)
            config_file.chmod(0o600)
        primary = bench.add_router(r1, 0, config_file=config_file)
        backup = bench.add_router(r2, 1, config_file=config_file)
        common.sh(backup["notify_command"], "INSTANCE", "VR_1", "BACKUP", "100",
                  namespace=r2)
        common.sh(primary["notify_command"], "INSTANCE", "VR_1", "MASTER", "100",
                  namespace=r1)
        sides = [(a["directory"] / "conntrackd.conf", a["directory"] / "conntrackd.ctl",
                  a["directory"] / "conntrackd.log") for a in (primary, backup)]
    else:
        sides = []
        for index, namespace in enumerate((r1, r2)):
            directory = bench.workdir / f"defaults{index}"
            directory.mkdir()
            config = directory / "conntrackd.conf"
            config.write_text(defaults_config(directory, index))
            common.sh("conntrackd", "-C", config, "-d", namespace=namespace)
            sides.append((config, directory / "ctl", directory / "conntrackd.log"))
        for _config, socket_path, _log in sides:
            if not common.wait_until(socket_path.exists, 10):
                raise RuntimeError(f"conntrackd did not create {socket_path}")
        time.sleep(0.5)
    return r1, r2, sides


def stats_text(config):
    return "\n".join(
        subprocess.run(["conntrackd", "-C", str(config), "-s", *extra],
                       capture_output=True, text=True, timeout=20).stdout
        for extra in ((), ("network",), ("cache",)))


def interesting_lines(text):
    return [line.strip() for line in text.splitlines()
            if re.search(r"overrun|lost|no space|malformed|fail|resync|error", line,
                         re.I) and not re.search(r":\s+0(\s|$)|\s0/\s*0$", line)]


def pin_conntrackd(namespace, cpu):
    for process in common.lab_module.named_processes_in_namespace(namespace, "conntrackd"):
        for thread in process.threads():
            os.sched_setaffinity(thread.id, {cpu})


def on_primary_core():
    """Runs in a feeder before exec: the primary node's processes share CPU 0."""
    os.sched_setaffinity(0, {0})


def one_run(configuration, rate, seconds, pin=False):
    entries = min(MAX_ENTRIES, int(rate * seconds))
    per_batch = max(1, round(rate * BATCH_PERIOD))
    batches = max(1, entries // per_batch)
    entries = batches * per_batch
    lines = common.snat_entry_lines(entries)
    with common.Bench("replication-lag") as bench:
        batch_files = []
        for k in range(batches):
            path = bench.workdir / f"batch{k}.txt"
            path.write_text("".join(lines[k * per_batch:(k + 1) * per_batch]))
            batch_files.append(path)
        r1, r2, sides = start_pair(bench, configuration)
        (primary_config, _primary_socket, _primary_log), \
            (backup_config, backup_socket, backup_log) = sides
        samples_path = bench.workdir / "samples.txt"
        warm = configuration in WARM
        poller = common.start_sync_poller(bench, r1, backup_socket, samples_path,
                                          0.001, seconds + 60,
                                          replica_namespace=r2 if warm else None)

        feeder_affinity = None
        if pin:
            pin_conntrackd(r1, 0)
            pin_conntrackd(r2, 1)
            os.sched_setaffinity(poller.pid, {0})
            feeder_affinity = on_primary_core

        def replica_count():
            if warm:
                return common.conntrack_count(r2)
            return common.cache_counts(backup_socket).external_active

        time.sleep(0.5)
        load = os.getloadavg()[0]
        written, feeders = [], []
        start = time.time() + 0.05
        for k, path in enumerate(batch_files):
            delay = start + k * BATCH_PERIOD - time.time()
            if delay > 0:
                time.sleep(delay)
            written.append(time.time())
            feeders.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{r1}", "conntrack", "-R", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=feeder_affinity))
            feeders = [each for each in feeders if each.poll() is None]
        for each in feeders:
            each.wait(timeout=60)
        fed_until = time.time()
        # Settle: the replica stable for 2 s, at most 20 s.
        last, stable_since = None, time.time()
        while time.time() - fed_until < 20:
            now = replica_count()
            if now != last:
                last, stable_since = now, time.time()
            elif time.time() - stable_since >= 2:
                break
            time.sleep(0.1)
        settled_after = time.time() - fed_until
        primary_kernel = common.conntrack_count(r1)
        stats_backup = stats_text(backup_config)
        stats_primary = stats_text(primary_config)
        poller.terminate()
        poller.wait(timeout=10)
        samples = common.read_sync_samples(samples_path)
        log_lines = [line for line in backup_log.read_text(errors="replace")
                     .splitlines() + _read(sides[0][2]).splitlines()
                     if re.search(r"overrun|resync|no space|lost|ERROR|WARNING", line)]
    kernel_base, replica_base = samples[0][1], samples[0][2]
    kernel_lags, replication_lags, unreached = [], [], 0
    kernel_index = 0
    for k in range(batches):
        target = (k + 1) * per_batch
        while kernel_index < len(samples) and \
                samples[kernel_index][1] - kernel_base < target:
            kernel_index += 1
        if kernel_index >= len(samples):
            break
        kernel_lags.append((samples[kernel_index][0] - written[k]) * 1000)
    # Per entry: the n-th new entry is on the primary when its kernel count first
    # reaches n, on the backup when its replica first reaches n.
    step = max(1, entries // 5000)
    kernel_index = replica_index = 0
    for n in range(step, entries + 1, step):
        while kernel_index < len(samples) and samples[kernel_index][1] - kernel_base < n:
            kernel_index += 1
        while replica_index < len(samples) and \
                samples[replica_index][2] - replica_base < n:
            replica_index += 1
        if kernel_index >= len(samples):
            break
        if replica_index >= len(samples):
            unreached += step
            continue
        replication_lags.append(
            max(0.0, samples[replica_index][0] - samples[kernel_index][0]) * 1000)
    intervals = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
    in_kernel = primary_kernel - kernel_base
    on_backup = last - replica_base
    return {
        "configuration": configuration + (" (pinned)" if pin else ""), "rate": rate, "entries": entries,
        "batches": batches, "per_batch": per_batch, "loadavg": load,
        "achieved_rate": entries / max(1e-9, fed_until - written[0]),
        "kernel_lag_p50": common.percentile(kernel_lags, 0.5),
        "kernel_lag_p99": common.percentile(kernel_lags, 0.99),
        "lag_p50": common.percentile(replication_lags, 0.5),
        "lag_p99": common.percentile(replication_lags, 0.99),
        "lag_max": max(replication_lags, default=float("nan")),
        "entries_never_on_backup_in_samples": unreached,
        "sample_interval_p50_ms": common.percentile(intervals, 0.5) * 1000,
        "in_primary_kernel": in_kernel, "on_backup": on_backup,
        "lost": in_kernel - on_backup, "settled_after_s": settled_after,
        "backup_stats": interesting_lines(stats_backup),
        "primary_stats": interesting_lines(stats_primary),
        "log": log_lines[-10:],
    }


def _read(path):
    try:
        return open(path, errors="replace").read()
    except OSError:
        return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2000,20000,50000,100000,150000",
                        help="new entries per second to feed, comma-separated")
    parser.add_argument("--configurations", default="snat-sync,snat-sync-cold,defaults",
                        help="which configurations to measure at each rate")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="how long each feed lasts")
    parser.add_argument("--pin", action="store_true",
                        help="a core per node: the backup's conntrackd on CPU 1, "
                             "everything else on CPU 0")
    parser.add_argument("--json", help="write the results to this file")
    arguments = parser.parse_args()
    print(common.uptime_line(), flush=True)
    results = []
    for rate in (int(each) for each in arguments.rates.split(",")):
        for configuration in arguments.configurations.split(","):
            result = one_run(configuration, rate, arguments.seconds, arguments.pin)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(common.uptime_line())
    print()
    print("| rate asked (achieved) | conntrackd | kernel insert lag p50 / p99 "
          "| replication lag p50 / p99 / max | lost | load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rate']:,}/s ({r['achieved_rate']:,.0f}/s) | {r['configuration']} "
              f"| {r['kernel_lag_p50']:.1f} / {r['kernel_lag_p99']:.1f} ms "
              f"| {r['lag_p50']:.1f} / {r['lag_p99']:.1f} / {r['lag_max']:.1f} ms "
              f"| {r['lost']:,} of {r['in_primary_kernel']:,} | {r['loadavg']:.2f} |")
    if arguments.json:
        with open(arguments.json, "w") as stream:
            json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main()
