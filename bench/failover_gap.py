"""Benchmark: data-plane gap of live flows at failover, and flows alive after it.

Each scenario is the failover demo's (snat_sync.lab.demo): a fresh namespace lab with two
keepalived routers (advert_int 1) that SNAT, 16 TCP + 16 UDP long-lived flows from 8
client addresses (shared source ports), r1 crashed 3 s in, flows kept 10 s more.
It is assembled here from demo's and lab's own steps because run_scenario has no way
to pass a snat-sync config file or to restart conntrackd with an edited config (and
because an upstream-like backup is expected to hold fewer idle entries than loaded,
which run_scenario's idle_entries setting treats as an error). Setups:

  snat-sync        `snat-sync router add` with its defaults
  upstream-like    the behaviour of the upstream example config and primary/backup
                   script, emulated with snat-sync's own renderer: a config file with
                   [conntrackd] protocols = TCP,SCTP,DCCP, hash_limit = 131072 and
                   [failover] reset_window_guard = false; render.hash_limit raises the
                   limit to 2 x nf_conntrack_max, so after `router add` the line
                   `HashLimit 524288` of each rendered conntrackd.conf is rewritten to
                   `HashLimit 131072`, conntrackd is stopped (`-k`) and started again
                   in its namespace with the edited file (then moved back to
                   SCHED_OTHER, as snat-sync does); the hook still commits first thing
                   on MASTER, after keepalived raised the addresses, with no guard
  no sync          keepalived alone

Idle entries (lab.load_idle_entries, `conntrack -R`) are loaded into r1 after it
became primary and before the flows start; with sync, the run waits until r2's
external cache stops growing. "VRRP detection" is the crash -> r2 holds the VIP time
the demo measures (50 ms polling); the gap is the longest silence of a flow that is
alive at the end (flows send every 50-100 ms; TCP gaps include retransmission
backoff).

    python3 bench/failover_gap.py [--idle 0,100000,200000] [--repeat-zero 3]
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from snat_sync.lab import demo  # noqa: E402
from snat_sync.lab import flows  # noqa: E402
from snat_sync.lab import topology as lab_module  # noqa: E402

UPSTREAM_LIKE_CONFIG = """[conntrackd]
protocols = TCP,SCTP,DCCP
hash_limit = 131072

[failover]
reset_window_guard = false
"""
UPSTREAM_HASH_LIMIT = 131072


def register(lab, router, state_path, config_file):
    args = ["--config-file", config_file] if config_file else []
    answer = json.loads(lab_module.snat_sync(
        state_path, *args, "router", "add", lab.router_id,
        "--namespace", router.namespace, "--ha-interface", router.ha.device,
        "--local-address", router.ha_address, "--peer-address", router.peer_ha_address,
        "--vrid", lab.vrid, "--json").stdout)
    return answer


def restart_with_hash_limit(router, answer, limit):
    """Rewrite HashLimit in the rendered conntrackd.conf and restart its conntrackd."""
    config = pathlib.Path(answer["conntrackd_config"])
    text, count = re.subn(r"HashLimit \d+", f"HashLimit {limit}", config.read_text())
    assert count == 1, config
    config.write_text(text)
    directory = config.parent
    subprocess.run(["conntrackd", "-C", str(config), "-k"], capture_output=True,
                   timeout=10)
    if not lab_module.wait_until(
            lambda: not lab_module.named_processes_in_namespace(router.namespace,
                                                                "conntrackd"), 10):
        lab_module.kill_processes(
            lab_module.named_processes_in_namespace(router.namespace, "conntrackd"))
    for stale in ("conntrackd.lock", "conntrackd.ctl"):
        (directory / stale).unlink(missing_ok=True)
    lab_module.run(["conntrackd", "-C", str(config), "-d"], namespace=router.namespace)
    if not lab_module.wait_until((directory / "conntrackd.ctl").exists, 10):
        raise lab_module.LabError("restarted conntrackd made no control socket")
    for process in lab_module.named_processes_in_namespace(router.namespace,
                                                           "conntrackd"):
        for thread in process.threads():
            os.sched_setscheduler(thread.id, os.SCHED_OTHER, os.sched_param(0))


def external_cache(answer):
    try:
        return common.cache_counts(pathlib.Path(answer["state_directory"])
                                   / "conntrackd.ctl")
    except OSError:
        return None


def wait_until_stable(answer, stable=3.0, limit=90):
    last, since, deadline = None, time.time(), time.time() + limit
    while time.time() < deadline:
        stats = external_cache(answer)
        now = stats.external_active if stats else None
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= stable:
            break
        time.sleep(0.2)
    return external_cache(answer)


def wait_for_primary_transition(state_path, router_id, timeout=90):
    """r2's last transition once it is a finished primary one (done or failed)."""
    found = {}

    def finished():
        status = lab_module.snat_sync_status(state_path, router_id)[0]
        found.update(status.get("last_transition") or {})
        return (found.get("role") == "primary"
                and found.get("outcome") in ("done", "failed"))

    lab_module.wait_until(finished, timeout, interval=0.5)
    return found


def run_one(workdir, setup, idle, settings, say):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True)
    config_file = None
    if setup == "upstream-like":
        config_file = workdir / "upstream-like.conf"
        config_file.write_text(UPSTREAM_LIKE_CONFIG)
    prefix = f"ssb-{secrets.token_hex(3)}"
    info = {"setup": setup, "idle": idle}
    with lab_module.running_lab(workdir / "lab", prefix=prefix) as lab:
        r1, r2 = lab.routers
        answers = {}
        if setup != "no sync":
            for router in lab.routers:
                answers[router.name] = register(lab, router, workdir / router.name,
                                                config_file)
                if setup == "upstream-like":
                    restart_with_hash_limit(router, answers[router.name],
                                            UPSTREAM_HASH_LIMIT)
        for router in lab.routers:
            notify = answers.get(router.name, {}).get("notify_command")
            lab_module.start_keepalived(lab, router, notify, settings.advert_int)
        lab_module.wait_for_primary(lab, r1)
        if answers:
            demo.wait_for_role(workdir / "r1", lab.router_id, "primary")
            demo.wait_for_role(workdir / "r2", lab.router_id, "backup")
        if idle:
            started = time.time()
            info["idle_loaded"] = lab_module.load_idle_entries(r1, idle, workdir)
            info["idle_load_s"] = time.time() - started
            if answers:
                stats = wait_until_stable(answers["r2"])
                info["backup_cache_after_idle"] = stats and stats.external_active
                info["idle_replicated_s"] = time.time() - started
        info["loadavg"] = os.getloadavg()[0]
        server = demo.start_server(lab, workdir, settings.client_duration + 10)
        client = demo.start_client(lab, workdir, settings)
        time.sleep(settings.crash_after)
        if answers:
            stats = external_cache(answers["r2"])
            info["backup_cache_before_crash"] = stats and stats.external_active
            info["backup_cache_no_space"] = stats and stats.external_no_space
        failover_seconds = demo.crash_primary(lab)
        demo.wait_for_exit(client, workdir / "client.log", settings.client_duration + 20)
        demo.stop_server(server, workdir / "server.log")
        if answers:
            transition = wait_for_primary_transition(workdir / "r2", lab.router_id)
            info["transition_outcome"] = transition.get("outcome")
            steps = {step["name"]: step for step in transition.get("steps", [])}
            info["commit_ms"] = steps.get("commit", {}).get("duration_ms")
            info["commit"] = transition.get("commit")
            info["transition_errors"] = transition.get("errors")
        info["r2_kernel_after"] = lab_module.kernel_entry_count(r2)
    results = flows.merge_reports(
        json.loads((workdir / "client.json").read_text()),
        json.loads((workdir / "server.json").read_text()))
    summary = flows.summarize(results)
    info.update(dataclasses.asdict(summary))
    info["failover_s"] = failover_seconds
    say(json.dumps(info))
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", default="0,100000,200000")
    parser.add_argument("--setups", default="snat-sync,upstream-like,no sync")
    parser.add_argument("--repeat-zero", type=int, default=3)
    parser.add_argument("--json")
    arguments = parser.parse_args()
    settings = demo.ScenarioSettings()
    setups = arguments.setups.split(",")
    plan = []
    for idle in (int(each) for each in arguments.idle.split(",")):
        repeats = arguments.repeat_zero if idle == 0 else 1
        for repeat in range(repeats):
            for setup in setups:
                if setup == "no sync" and idle:
                    continue  # without sync, r2's table is empty whatever r1 holds
                plan.append((setup, idle, repeat))
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(common.uptime_line())
    workdir = tempfile.mkdtemp(prefix="snat-sync-failover-gap-")
    previous = signal.signal(signal.SIGTERM, common._raise_interrupt)
    results = []
    try:
        for number, (setup, idle, repeat) in enumerate(plan):
            results.append(run_one(os.path.join(workdir, str(number)), setup, idle,
                                   settings, say))
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    say(common.uptime_line())
    print()
    print("| setup | idle entries | TCP alive | UDP alive, same port | longest gap "
          "TCP / UDP | VRRP detection | commit | backup cache before crash | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        def gap(ms, alive):
            return f"{ms / 1000:.2f} s" if alive else "-"
        commit = f"{r['commit_ms']:.0f} ms" if r.get("commit_ms") is not None else "-"
        cache = r.get("backup_cache_before_crash")
        cache = "-" if cache is None else (
            f"{cache:,}" + (f" ({r['backup_cache_no_space']:,} no space)"
                            if r.get("backup_cache_no_space") else ""))
        print(f"| {r['setup']} | {r['idle']:,} | {r['tcp_alive']}/{r['tcp_total']} "
              f"| {r['udp_alive_same_endpoint']}/{r['udp_total']} "
              f"| {gap(r['tcp_longest_gap_ms'], r['tcp_alive'])} / "
              f"{gap(r['udp_longest_gap_ms'], r['udp_alive'])} "
              f"| {r['failover_s']:.2f} s | {commit} | {cache} | {r['loadavg']:.2f} |")
    if arguments.json:
        with open(arguments.json, "w") as stream:
            json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main()
