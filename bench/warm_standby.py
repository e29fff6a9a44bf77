"""Benchmark: warm standby against cold standby against no sync, at table sizes up to 1M.

What a failover costs the live flows when the backup's kernel table already holds
the replicated entries (warm) against committing them at takeover (cold), and how
that cost grows with the table. One run measures every (mode, idle entries, failure)
scenario of the plan, side by side, on the same machine and load.

Each scenario is snat_sync.lab.demo.run_scenario: a fresh namespace lab with two
keepalived routers (advert_int 1) that SNAT, 16 TCP + 16 UDP long-lived flows from 8
client addresses (shared source ports), r1 failed --crash-after s (default 6) after
the flows start, flows kept --run-after-crash s (default 10) more, plus
--extra-run-per-100k s (default 2) per 100,000 idle entries: a cold commit runs at
about 50,000 entries/s, so at 1M it takes some 20 s, and flows that stop before it
ends would measure nothing (the same extra for every mode at one size). Modes:

  warm      `snat-sync router add` with its defaults: [failover] standby_mode = warm,
            the backup's conntrackd injects replicated entries into its kernel
            table and the refresh table re-announces live flows every 4 s, so the
            new primary loads nothing
  warm-quiet  warm, with `[failover] backup_reads_events = false`: a backup's
            conntrackd reads no conntrack events, a takeover restarts it with
            the primary's configuration
  cold      a config file with `[failover] standby_mode = cold`: external cache on
            the backup, committed at takeover behind the reset-window guard
  no-sync   keepalived alone (the floor: VRRP detection, and what is lost without
            any sync); run at 0 idle entries only, since without sync r2's table
            is empty whatever r1 holds

Failures: `switchover` (r1's keepalived stopped: priority-0 advert) and `crash`
(r1's node dies; VRRP detection about 3 x advert_int).

Idle entries (lab.load_idle_entries, `conntrack -R`, half TCP half UDP, SNAT'ed) are
loaded into r1 after it became primary and before the flows start; with sync the
scenario waits until r2 holds them all (kernel table or external cache): that wait
is "backup held idle". When the largest --idle does not fit the kernel's limits
(1.1 x entries), the GLOBAL net.netfilter.nf_conntrack_max and
/sys/module/nf_conntrack/parameters/hashsize are raised for the run and restored
at the end, however it ends; each router namespace's own nf_conntrack_max is
recorded (newer kernels may give a namespace its own limit) and a scenario that
loaded fewer entries than asked says so.

Columns: VIP move = failure -> r2 holds the VIP (50 ms polling); longest gap = the
longest silence of a flow alive at the end (flows send every 50-100 ms; TCP gaps
include retransmission backoff); UDP gap - VIP move = what the data plane lost
beyond VRRP itself (negative on a switchover: r1 forwards until its keepalived has
sent the priority-0 advert, and the VIP move timer starts at the stop); alive =
alive at the end AND seen by the server on one public address:port the whole run;
backup held idle = load start -> r2 holds every idle entry; new primary kernel =
r2's `conntrack -C` after the run; commit = the cold takeover's commit step. Also
recorded (JSON): r2's conntrackd RSS (in the table too) and the nf_conntrack slab
(active objects x object size, a global figure: others' namespaces count too)
before and after the idle entries were loaded, the new primary's transition steps.

--burst N turns every scenario into a crash right after a burst: instead of idle
entries loaded before the flows, N are loaded into r1 (`conntrack -R`, at full
speed) while the flows run, --crash-after s after they start, and r1 fails the
moment the load ends (r2's table size then is recorded): the replica is still
behind, and the flows must survive on what it holds.

A scenario that fails prints its error in its row and the run goes on.

    python3 bench/warm_standby.py [--idle 0,200000,1000000]
        [--failures switchover,crash] [--modes warm,cold,no-sync] [--repeat N]
        [--json FILE]
        [--crash-after 6] [--run-after-crash 10] [--extra-run-per-100k 2]
        [--burst 1000000]
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from snat_sync.lab import demo  # noqa: E402
from snat_sync.lab import topology as lab_module  # noqa: E402

MODES = {"warm": "", "warm-quiet": "[failover]\nbackup_reads_events = false\n",
         "cold": "[failover]\nstandby_mode = cold\n", "no-sync": None}


# --- cheap memory figures -------------------------------------------------------------


def conntrack_slab_bytes():
    """Active nf_conntrack slab objects x object size (all namespaces), or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in open("/proc/slabinfo"):
            fields = line.split()
            if fields and fields[0] == "nf_conntrack":
                return int(fields[1]) * int(fields[3])
    return None


def conntrackd_rss(namespace):
    """Resident bytes of the conntrackd processes in namespace, or None."""
    total = None
    with contextlib.suppress(Exception):
        for process in lab_module.named_processes_in_namespace(namespace, "conntrackd"):
            with contextlib.suppress(Exception):
                total = (total or 0) + process.memory_info().rss
    return total


def namespace_conntrack_max(namespace):
    with contextlib.suppress(Exception):
        return int(lab_module.run(["cat", str(common.CONNTRACK_MAX)],
                                  namespace=namespace).stdout.split()[0])
    return None


class Sampler:
    """The progress callback of run_scenario: says each step and takes the memory
    figures at the steps around the idle load (r1 primary; flows starting)."""

    def __init__(self, prefix, say):
        self.backup = f"{prefix}-r2"
        self.router = f"{prefix}-r1"
        self.say = say
        self.figures = {}

    def __call__(self, line):
        self.say("  " + line)
        if line.startswith("lab "):
            self.figures["router_nf_conntrack_max"] = namespace_conntrack_max(self.router)
        elif line.startswith("r1 is primary"):
            self.figures["backup_conntrackd_rss_before"] = conntrackd_rss(self.backup)
            self.figures["conntrack_slab_bytes_before"] = conntrack_slab_bytes()
        elif " flows running" in line:
            self.figures["backup_conntrackd_rss_after"] = conntrackd_rss(self.backup)
            self.figures["conntrack_slab_bytes_after"] = conntrack_slab_bytes()


# --- one scenario ---------------------------------------------------------------------


def replication_timeout(idle):
    """Generous: at least 60 s, and 5,000 entries a second at worst."""
    return max(60.0, idle / 5000)


def transition_facts(result):
    transition = result.last_transition or {}
    steps = transition.get("steps") or []
    commit = next((step for step in steps if step.get("name") == "commit"), {})
    return {
        "transition_outcome": transition.get("outcome"),
        "transition_steps": [step.get("name") for step in steps],
        "commit_ms": commit.get("duration_ms"),
        "commit": transition.get("commit"),
        "transition_errors": transition.get("errors"),
    }


def alive_same_port(result, protocol):
    return sum(1 for flow in result.flows
               if flow.protocol == protocol and flow.alive and flow.same_public_endpoint)


def run_one(workdir, mode, idle, failure, arguments, say):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True)
    info = {"mode": mode, "idle": idle, "failure": failure,
            "loadavg": os.getloadavg()[0]}
    snat_sync_arguments = ()
    if MODES[mode] is not None:
        config_file = workdir / f"{mode}.conf"
        config_file.write_text(MODES[mode])
        snat_sync_arguments = ("--config-file", str(config_file))
    run_after_crash = (arguments.run_after_crash
                       + arguments.extra_run_per_100k * idle / 100_000)
    info["run_after_crash_s"] = run_after_crash
    settings = demo.ScenarioSettings(
        crash_after=arguments.crash_after, run_after_crash=run_after_crash,
        idle_entries=idle, failure=failure, snat_sync_arguments=snat_sync_arguments,
        replication_timeout=replication_timeout(idle),
        burst_entries=arguments.burst,
        # conntrack -R loads some 37,000 entries a second here; twice that time.
        burst_budget=10 + arguments.burst / 18_000 if arguments.burst else 0.0)
    prefix = f"ssb-{secrets.token_hex(3)}"
    sampler = Sampler(prefix, say)
    started = time.monotonic()
    try:
        result = demo.run_scenario(workdir / "lab",
                                   with_snat_sync=MODES[mode] is not None,
                                   settings=settings, prefix=prefix, progress=sampler)
    except Exception as error:  # noqa: BLE001 - the row says it, the run goes on
        info["error"] = f"{type(error).__name__}: {error}"
        info["traceback"] = traceback.format_exc()
    else:
        summary = result.summary
        info.update(dataclasses.asdict(summary))
        info.update(
            failover_s=result.failover_seconds,
            tcp_alive_same_port=alive_same_port(result, "tcp"),
            udp_alive_same_port=alive_same_port(result, "udp"),
            idle_loaded=result.idle_entries_loaded,
            idle_replicated_s=result.idle_replication_seconds,
            new_primary_kernel_entries=result.new_primary_kernel_entries,
            failure_at_s=result.failure_at,
            burst_load_s=result.burst_load_seconds,
            backup_entries_at_failure=result.backup_entries_at_failure,
            dead_before_failure=[flow.flow_id for flow in result.dead_before_failure()],
            **transition_facts(result))
        if summary.udp_alive:
            info["udp_gap_minus_vip_s"] = (summary.udp_longest_gap_ms / 1000
                                           - result.failover_seconds)
        if idle and result.idle_entries_loaded < idle:
            info["note"] = (f"only {result.idle_entries_loaded:,} of {idle:,} idle "
                            f"entries loaded (router nf_conntrack_max "
                            f"{sampler.figures.get('router_nf_conntrack_max')})")
    info.update(sampler.figures)
    info["scenario_s"] = time.monotonic() - started
    say(json.dumps({key: value for key, value in info.items() if key != "traceback"}))
    return info


# --- the table ------------------------------------------------------------------------


def megabytes(value):
    return "-" if value is None else f"{value / 1e6:.1f} MB"


def seconds(value):
    return "-" if value is None else f"{value:.2f} s"


def row(r):
    head = f"| {r['mode']} | {r['idle']:,} | {r['failure']} "
    if "error" in r:
        message = " ".join(r["error"].split())
        if len(message) > 300:
            message = message[:297] + "..."
        return head + f"| error: {message} |" + " |" * 10

    def gap(ms, alive):
        return f"{ms / 1000:.2f} s" if alive else "-"

    idle_held = seconds(r.get("idle_replicated_s")) if r["idle"] else "-"
    if r.get("note"):
        idle_held += f" ({r['note']})"
    kernel = r.get("new_primary_kernel_entries")
    rss = (f"{megabytes(r.get('backup_conntrackd_rss_before'))} -> "
           f"{megabytes(r.get('backup_conntrackd_rss_after'))}"
           if r.get("backup_conntrackd_rss_after") is not None else "-")
    commit = f"{r['commit_ms']:.0f} ms" if r.get("commit_ms") is not None else "-"
    return (head + f"| {r['failover_s']:.2f} s "
            f"| {gap(r['tcp_longest_gap_ms'], r['tcp_alive'])} "
            f"| {gap(r['udp_longest_gap_ms'], r['udp_alive'])} "
            f"| {seconds(r.get('udp_gap_minus_vip_s'))} "
            f"| {r['tcp_alive_same_port']}/{r['tcp_total']} "
            f"| {r['udp_alive_same_port']}/{r['udp_total']} "
            f"| {idle_held} "
            f"| {'-' if kernel is None else f'{kernel:,}'} "
            f"| {commit} | {rss} | {r['loadavg']:.2f} |")


def print_table(results):
    print("| mode | idle entries | failure | VIP move | longest gap TCP "
          "| longest gap UDP | UDP gap - VIP move | TCP alive, same port "
          "| UDP alive, same port | backup held idle after | new primary kernel "
          "entries | commit | backup conntrackd RSS | load |")
    print("|" + " --- |" * 14)
    for r in results:
        print(row(r))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=common.integer_list, default="0,200000",
                        help="idle entry counts, comma-separated (default 0,200000)")
    parser.add_argument("--failures", default="switchover,crash",
                        help="failures to run, comma-separated: switchover "
                             "(keepalived stopped on the primary), crash (the "
                             "primary node killed) (default switchover,crash)")
    parser.add_argument("--modes", default="warm,cold,no-sync",
                        help=f"standby modes, comma-separated, of {', '.join(MODES)} "
                             "(default warm,cold,no-sync; no-sync runs only with "
                             "an empty table)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole plan this many times, one pass after "
                             "the other, for the spread (default 1)")
    parser.add_argument("--crash-after", type=float, default=6.0,
                        help="seconds of traffic before the failure (default 6)")
    parser.add_argument("--run-after-crash", type=float, default=10.0,
                        help="seconds of traffic after the failure, at an empty "
                             "table (default 10)")
    parser.add_argument("--extra-run-per-100k", type=float, default=2.0,
                        help="seconds added to --run-after-crash per 100,000 idle "
                             "entries (default 2)")
    parser.add_argument("--burst", type=int, default=0,
                        help="entries loaded into r1 while the flows run, the "
                             "failure right after the load (use with --idle 0)")
    parser.add_argument("--json", help="write every scenario's figures to this file")
    arguments = parser.parse_args()
    sizes = arguments.idle
    if arguments.repeat < 1:
        parser.error(f"--repeat {arguments.repeat}: must be at least 1")
    failures = arguments.failures.split(",")
    modes = [each.strip().replace(" ", "-") for each in arguments.modes.split(",")]
    for value, known in ((failures, demo.FAILURES), (modes, MODES)):
        unknown = [each for each in value if each not in known]
        if unknown:
            parser.error(f"unknown {unknown}; known: {', '.join(known)}")
    plan = [(mode, idle, failure) for _ in range(arguments.repeat)
            for idle in sizes for failure in failures for mode in modes
            if not (mode == "no-sync" and idle)]
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(common.uptime_line())
    workdir = tempfile.mkdtemp(prefix="snat-sync-warm-standby-")
    previous = signal.signal(signal.SIGTERM, common._raise_interrupt)
    results = []
    try:
        with common.kernel_limits_for(max(*sizes, arguments.burst), say) as limits:
            say(f"kernel limits for the run: {json.dumps(limits)}")
            for number, (mode, idle, failure) in enumerate(plan):
                say(f"[{number + 1}/{len(plan)}] {mode}, {idle:,} idle entries, "
                    f"{failure}")
                results.append(run_one(os.path.join(workdir, str(number)), mode, idle,
                                       failure, arguments, say))
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
        say(common.uptime_line())
        if results:
            print()
            print_table(results)
            if arguments.json:
                with open(arguments.json, "w") as stream:
                    json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main()
