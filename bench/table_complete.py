"""Benchmark: from the VIP appearing on the new primary to its table being complete.

For each size N: a fresh pair of router namespaces (one veth as HA network, no
keepalived) with conntrackd run by `snat-sync router add` on both; the backup's hook
runs `INSTANCE VR_1 BACKUP 100` and the primary's `... MASTER 100`. N established
SNAT entries are loaded into the primary's kernel with `conntrack -R FILE`; the
benchmark waits until the backup's external cache holds all N. Then, inside the
backup's namespace, one shell adds the VIP with `ip addr add` (what keepalived does
first), stamps the time and execs the notify hook `INSTANCE VR_1 MASTER 100` (what
keepalived does next).

  VIP -> complete   VIP stamp to the end of the commit step in last-transition.json;
                    cross-checked by `conntrack -C` afterwards and by a poller inside
                    the namespace that samples nf_conntrack_count every 2 ms
  floor (raw load)  `conntrack -R FILE` of the same file into an empty namespace,
                    wall time, measured in the same run just before and just after
                    the failover; the floor is the mean of the two

    python3 bench/table_complete.py [--sizes 10000,100000,250000] [--runs 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VIP = "192.168.100.1/24"


def raw_load_seconds(bench, path, suffix):
    namespace = bench.namespace(f"raw{suffix}")
    started = time.time()
    common.sh("conntrack", "-R", path, namespace=namespace, timeout=300)
    elapsed = time.time() - started
    count = common.conntrack_count(namespace)
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
    bench.namespaces.remove(namespace)
    return elapsed, count


def wait_for_backup(backup_socket, size, stall=10, limit=120):
    """Wait until the backup's external cache holds size entries; give up after it
    has not grown for `stall` s (or after `limit` s). Returns whether it got there."""
    deadline = time.time() + limit
    last, grown_at = -1, time.time()
    while time.time() < deadline:
        count = common.cache_counts(backup_socket).external_active
        if count >= size:
            return True
        if count != last:
            last, grown_at = count, time.time()
        elif time.time() - grown_at > stall:
            return False
        time.sleep(0.2)
    return False


def one_run(size, run_index, entries_path):
    with common.Bench("table-complete") as bench:
        r1, r2 = bench.router_pair()
        primary = bench.add_router(r1, 0)
        backup = bench.add_router(r2, 1)
        common.sh(backup["notify_command"], "INSTANCE", "VR_1", "BACKUP", "100",
                  namespace=r2)
        common.sh(primary["notify_command"], "INSTANCE", "VR_1", "MASTER", "100",
                  namespace=r1)
        backup_socket = backup["directory"] / "conntrackd.ctl"
        load_started = time.time()
        common.sh("conntrack", "-R", entries_path, namespace=r1, timeout=300)
        loaded = time.time() - load_started
        replicated = wait_for_backup(backup_socket, size)
        stats = common.cache_counts(backup_socket)
        replicated_after = time.time() - load_started
        short_after_load = size - stats.external_active
        resync_requests = 0
        while not replicated and resync_requests < 3:
            # FTFW gave up on some messages: ask the primary for its whole table,
            # as snat-sync's backup transition does (conntrackd -n).
            common.sh("conntrackd", "-C", backup["conntrackd_config"], "-n")
            resync_requests += 1
            replicated = wait_for_backup(backup_socket, size)
        stats = common.cache_counts(backup_socket)
        if not replicated:
            raise RuntimeError(f"backup external cache holds {stats.external_active} "
                               f"of {size} after {resync_requests} resyncs (no space: "
                               f"{stats.external_no_space})")
        before = common.conntrack_count(r2)
        raw, raw_count = raw_load_seconds(bench, entries_path, run_index)
        load = os.getloadavg()[0]
        poll_path = bench.workdir / "count.txt"
        poller = common.start_count_poller(bench, r2, poll_path, 0.002, 30)
        time.sleep(0.3)
        vip_path = bench.workdir / "vip.txt"
        script = (f"ip addr add {VIP} dev qr0 && echo $EPOCHREALTIME > {vip_path} && "
                  f"exec {backup['notify_command']} INSTANCE VR_1 MASTER 100")
        common.sh("bash", "-c", script, namespace=r2, timeout=300)
        after = common.conntrack_count(r2)
        poller.terminate()
        poller.wait()
        raw_after, _count = raw_load_seconds(bench, entries_path, f"{run_index}b")
        vip = float(vip_path.read_text())
        record = json.loads((backup["directory"] / "last-transition.json").read_text())
        commit = record["steps"][0]
        assert commit["name"] == "commit" and commit["run_by"] == "notify-hook", record
        commit_end = commit["started"] + commit["duration_ms"] / 1000
        target = before + size
        reached = next((stamp for stamp, count in common.read_count_samples(poll_path)
                        if count >= target), None)
        return {
            "size": size, "run": run_index, "loadavg": load,
            "primary_load_s": loaded, "replicated_after_s": replicated_after,
            "missing_on_backup_after_load": short_after_load,
            "resync_requests": resync_requests,
            "raw_load_s": (raw + raw_after) / 2, "raw_before_s": raw,
            "raw_after_s": raw_after, "raw_count": raw_count,
            "vip_to_commit_start_ms": (commit["started"] - vip) * 1000,
            "commit_ms": commit["duration_ms"],
            "vip_to_complete_ms": (commit_end - vip) * 1000,
            "vip_to_count_reached_ms": (reached - vip) * 1000 if reached else None,
            "kernel_before": before, "kernel_after": after,
            "commit_ok": commit["ok"], "commit_record": record.get("commit"),
            "outcome": record["outcome"], "errors": record["errors"],
            "ratio": (commit_end - vip) / ((raw + raw_after) / 2),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,250000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="write the results here too")
    arguments = parser.parse_args()
    max_entries = int(open("/proc/sys/net/netfilter/nf_conntrack_max").read())
    print(common.uptime_line())
    print(f"nf_conntrack_max {max_entries}")
    results = []
    workdir = common.tempfile.mkdtemp(prefix="snat-sync-entries-")
    try:
        for size in (int(each) for each in arguments.sizes.split(",")):
            if size > max_entries - 100:
                print(f"{size} entries do not fit nf_conntrack_max {max_entries}; "
                      f"using {max_entries - 100}")
                size = max_entries - 100
            entries_path = common.write_entries(os.path.join(workdir, f"{size}.txt"),
                                                size)
            for run_index in range(arguments.runs):
                result = one_run(size, run_index, entries_path)
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        subprocess.run(["rm", "-rf", workdir])
    print(common.uptime_line())
    print()
    for size in sorted({result["size"] for result in results}):
        ratios = [r["ratio"] for r in results if r["size"] == size]
        print(f"{size:,} entries: median ratio {statistics.median(ratios):.2f}x over "
              f"{len(ratios)} runs")
    print()
    print("| entries | VIP -> commit start | commit | VIP -> table complete "
          "| raw `conntrack -R` before / after (floor = mean) | ratio | count check | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        reached = result["vip_to_count_reached_ms"]
        print(f"| {result['size']:,} | {result['vip_to_commit_start_ms']:.1f} ms "
              f"| {result['commit_ms']:.0f} ms | {result['vip_to_complete_ms']:.0f} ms "
              f"| {result['raw_before_s'] * 1000:.0f} / {result['raw_after_s'] * 1000:.0f}"
              f" ms | {result['ratio']:.2f}x "
              f"| {result['kernel_after'] - result['kernel_before']:,} after, "
              f"{result['missing_on_backup_after_load']:,} missing before resync, "
              f"reached at {reached:.0f} ms | {result['loadavg']:.2f} |"
              if reached is not None else
              f"| {result['size']:,} | ... count never reached: {result} |")
    if arguments.json:
        with open(arguments.json, "w") as stream:
            json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main()
