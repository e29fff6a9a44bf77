"""Benchmark: from keepalived running the notify hook to the commit.

Runs a router's notify hook the way keepalived does (fork and exec with
TYPE NAME STATE PRIORITY) and reads the transition record it leaves:
  hook start -> commit start   time until the hook starts `conntrackd -c`
  hook start -> commit end     the same plus the commit of an empty cache, an upper
                               bound that includes the flock and timeout wrappers
  hook start -> python start   what a hook written in Python would cost at least
Each timed MASTER run follows an untimed BACKUP run (a hook-run transition to the
role the router already has is skipped without a record).
Root; builds one namespace with a veth pair and removes it afterwards.

    python3 bench/notify_latency.py [--runs 50]
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

from snat_sync.lab import topology as lab_module


def sh(*command):
    subprocess.run(command, check=True)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    arguments = parser.parse_args()
    namespace = f"ssbench-{secrets.token_hex(3)}"
    workdir = tempfile.mkdtemp(prefix="snat-sync-bench-")
    state_path = os.path.join(workdir, "node")  # its sandbox config goes beside it
    # The lab's sandbox config (metrics port 0, no default files): never the host's.
    snat_sync = [str(argument) for argument in lab_module.snat_sync_argv(state_path)]
    sh("ip", "netns", "add", namespace)
    try:
        sh("ip", "-n", namespace, "link", "add", "ha0", "type", "veth",
           "peer", "name", "ha1")
        sh("ip", "-n", namespace, "address", "add", "169.254.192.1/18", "dev", "ha0")
        sh("ip", "-n", namespace, "link", "set", "ha0", "up")
        sh("ip", "-n", namespace, "link", "set", "ha1", "up")
        added = json.loads(subprocess.run(
            [*snat_sync, "router", "add", "bench", "--namespace", namespace,
             "--ha-interface", "ha0", "--local-address", "169.254.192.1",
             "--peer-address", "169.254.192.2", "--vrid", "1", "--json"],
            check=True, capture_output=True, text=True).stdout)
        hook = added["notify_command"]
        record_path = os.path.join(os.path.dirname(hook), "last-transition.json")
        to_commit_start, to_commit_end, to_python = [], [], []
        for _ in range(arguments.runs):
            # A hook-run transition to the role the router already has is skipped
            # unrecorded, so each timed MASTER follows an untimed BACKUP.
            subprocess.run([hook, "INSTANCE", "VR_1", "BACKUP", "100"], check=True)
            started = time.time()
            subprocess.run([hook, "INSTANCE", "VR_1", "MASTER", "100"], check=True)
            with open(record_path) as stream:
                record = json.load(stream)
            commit = record["steps"][0]
            assert record["role"] == "primary" and record["arrived"] >= started, record
            assert commit["run_by"] == "notify-hook" and commit["ok"], record
            to_commit_start.append((commit["started"] - started) * 1000)
            to_commit_end.append(
                (commit["started"] - started) * 1000 + commit["duration_ms"])
        for _ in range(arguments.runs):
            started = time.time()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            to_python.append((time.time() - started) * 1000)
        print(f"{arguments.runs} runs of the notify hook (ms):")
        for name, values in (("hook start -> commit start", to_commit_start),
                             ("hook start -> commit end", to_commit_end),
                             ("empty python start (for comparison)", to_python)):
            print(f"  {name:38s} p50 {statistics.median(values):6.2f}  "
                  f"p99 {percentile(values, 0.99):6.2f}  max {max(values):6.2f}")
    finally:
        subprocess.run([*snat_sync, "router", "remove", "bench"],
                       capture_output=True)
        subprocess.run(["ip", "netns", "delete", namespace])
        subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    main()
