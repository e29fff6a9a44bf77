"""The failover demo: the same crash, once with keepalived alone, once with snat-sync.

Each scenario builds a fresh lab (see `snat_sync.lab.topology`), lets r1 win the VRRP
election, starts long-lived TCP and UDP flows from the client through r1's SNAT to the
server, crashes r1 a few seconds in, keeps the flows going for a while after r2 has
taken over, and then asks every flow whether it is still alive and whether the server
saw it from one public address:port the whole time.

With snat-sync, r1 and r2 are each registered with `snat-sync router add` (each with
its own state path, as two separate nodes would have) before keepalived starts, and
keepalived's notify line is the command that `router add` printed.

    python3 -m snat_sync.lab.demo [--flows N]      (root; cleans up after itself)
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from snat_sync.lab import flows
from snat_sync.lab import topology as lab_module

DEFAULT_FLOWS = 16
REQUIRED_BINARIES = (
    "ip", "sysctl", "iptables", "nft", "nsenter", "keepalived", "conntrackd",
    "conntrack",
)
SERVER_PORT = flows.DEFAULT_PORT


@dataclasses.dataclass(frozen=True)
class ScenarioSettings:
    """Timing of one scenario.

    run_after_crash must cover TCP's retransmission backoff: a segment lost at the
    crash is retried 0.2, 0.6, 1.4, 3.0 and 6.2 s later. A failover takes 2.7 to 3.6 s
    with advert_int 1, so surviving TCP flows resume about 3 s or, when the failover
    missed the 3.0 s retry, about 6.2 s after the crash; then they need a reply in
    the run's last second to count as alive.
    """

    flows: int = DEFAULT_FLOWS
    crash_after: float = 3.0
    run_after_crash: float = 10.0
    advert_int: int = 1
    # Idle SNAT entries loaded into r1's table before the flows start (with
    # snat-sync, the scenario waits until r2's external cache holds them all).
    idle_entries: int = 0
    # Global snat-sync arguments for `router add`, e.g. ("--config-file", PATH).
    snat_sync_arguments: tuple = ()
    replication_timeout: float = 60.0
    # sysctl settings for both router namespaces, e.g. shorter conntrack timeouts:
    # (("net.netfilter.nf_conntrack_udp_timeout_stream", 10),)
    router_sysctls: tuple = ()
    # "crash": r1's node dies (crash_primary); "switchover": r1's keepalived is
    # stopped, as an operator does for maintenance (switch_over).
    failure: str = "crash"
    # A burst: idle SNAT entries loaded into r1's table while the flows run, after
    # crash_after; the failure follows the load at once. burst_budget is how long
    # the load may take (the flows run that much longer).
    burst_entries: int = 0
    burst_budget: float = 0.0

    @property
    def client_duration(self):
        return self.crash_after + self.burst_budget + self.run_after_crash


@dataclasses.dataclass(frozen=True)
class ScenarioResult:
    name: str
    with_snat_sync: bool
    flows: tuple
    summary: flows.TrafficSummary
    failover_seconds: float
    new_primary_status: dict | None
    idle_entries_loaded: int = 0
    idle_replication_seconds: float | None = None
    new_primary_kernel_entries: int | None = None
    # When r1 failed, in seconds since the flows started (the flows' own clock).
    failure_at: float | None = None
    # With a burst: how long r1's load took, and r2's table size at the failure.
    burst_load_seconds: float | None = None
    backup_entries_at_failure: int | None = None

    @property
    def last_transition(self):
        """The new primary's last snat-sync transition record, if snat-sync ran."""
        return (self.new_primary_status or {}).get("last_transition")

    def dead_before_failure(self, window=flows.ALIVE_WINDOW):
        """The flows that had no reply in the `window` seconds before r1 failed.

        A scenario that is to lose flows (a negative control) proves something
        only if they worked until the failure: on a broken lab, where no flow ever
        got a reply, "flows were lost" holds as well. It asserts this list empty.
        """
        return [flow for flow in self.flows
                if not flow.was_alive_at(self.failure_at, window)]


def read_flow_results(workdir):
    """(the flows' merged results, the client's report) from the reports the
    lab's client and server wrote in workdir (client.json, server.json)."""
    client_report = json.loads((workdir / "client.json").read_text())
    results = flows.merge_reports(client_report,
                                  json.loads((workdir / "server.json").read_text()))
    return results, client_report


def scenario_name(with_snat_sync):
    return "with snat-sync" if with_snat_sync else "keepalived only"


def node_state_path(workdir, router):
    """Each router namespace stands for a separate node with its own state path.

    Kept short on purpose: conntrackd's control socket lives below it, and UNIX
    socket paths must stay under 108 bytes even inside a deep pytest tmp_path.
    """
    return pathlib.Path(workdir) / router.name


def register_with_snat_sync(lab, workdir, snat_sync_arguments=()):
    """`router add` on both nodes; return each router's keepalived notify command."""
    return {
        router.name: lab_module.snat_sync_router_add(
            lab, router, node_state_path(workdir, router), *snat_sync_arguments
        ).notify_command
        for router in lab.routers
    }


def wait_for_role(state_path, router_id, role, timeout=15):
    """Wait until snat-sync's last transition for router_id is `role` and done."""

    def reached():
        statuses = lab_module.snat_sync_status(state_path, router_id)
        transition = statuses[0].get("last_transition") or {}
        return transition.get("role") == role and transition.get("outcome") == "done"

    if not lab_module.wait_until(reached, timeout, interval=0.2):
        raise lab_module.LabError(
            f"snat-sync in {state_path} did not finish a {role} transition of "
            f"{router_id} within {timeout}s"
        )


def start_server(lab, workdir, duration):
    ready = workdir / "server.ready"
    server = lab_module.start_process(
        lab,
        lab.server_namespace,
        lab_module.python_module(
            "snat_sync.lab.flows", "server",
            "--address", lab_module.SERVER_ADDRESS,
            "--port", SERVER_PORT,
            "--duration", duration,
            "--ready-file", ready,
            "--output", workdir / "server.json",
        ),
        workdir / "server.log",
    )
    if not lab_module.wait_until(ready.exists, timeout=10):
        raise lab_module.LabError(
            f"flow server did not start: {lab_module.read_tail(workdir / 'server.log')}"
        )
    return server


def start_client(lab, workdir, settings):
    return lab_module.start_process(
        lab,
        lab.client_namespace,
        lab_module.python_module(
            "snat_sync.lab.flows", "client",
            "--server", lab_module.SERVER_ADDRESS,
            "--port", SERVER_PORT,
            "--addresses", ",".join(lab_module.CLIENT_ADDRESSES),
            "--tcp-flows", settings.flows,
            "--udp-flows", settings.flows,
            "--duration", settings.client_duration,
            "--output", workdir / "client.json",
        ),
        workdir / "client.log",
    )


def wait_for_exit(process, log_path, timeout):
    """Wait for a flow program; raise LabError with its log if it fails or hangs."""
    command = " ".join(map(str, process.args))
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise lab_module.LabError(f"{command} still runs after {timeout}s") from None
    if status != 0:
        raise lab_module.LabError(
            f"{command} exited {status}: {lab_module.read_tail(log_path)}"
        )


def start_routers(lab, workdir, with_snat_sync, settings):
    """keepalived on both routers (notifying snat-sync when it is used) until r1 is
    primary and, with snat-sync, both transitions have run."""
    if not with_snat_sync:
        start_keepalived_pair(lab, {}, advert_int=settings.advert_int)
        return
    notify_commands = register_with_snat_sync(lab, workdir,
                                              settings.snat_sync_arguments)
    state_paths = {router.name: node_state_path(workdir, router)
                   for router in lab.routers}
    start_keepalived_pair(lab, notify_commands, state_paths, settings.advert_int)


def start_keepalived_pair(lab, notify_commands, state_paths=None, advert_int=1):
    """keepalived on every router (both of a pair), each with its notify command if
    it has one ({router name: command}), until r1 is primary and, given the nodes'
    snat-sync state paths ({router name: path}), r1's primary and the others'
    backup transitions have run."""
    r1, *backups = lab.routers
    for router in lab.routers:
        lab_module.start_keepalived(lab, router, notify_commands.get(router.name),
                                    advert_int)
    lab_module.wait_for_primary(lab, r1)
    if state_paths is not None:
        wait_for_role(state_paths[r1.name], lab.router_id, "primary")
        for backup in backups:
            wait_for_role(state_paths[backup.name], lab.router_id, "backup")


def load_idle_entries(lab, workdir, settings, with_snat_sync):
    """Load the idle entries into r1; with snat-sync, wait until r2 holds them all.

    Returns (entries loaded, seconds until r2's external cache held them or None).
    """
    r1, r2 = lab.routers
    started = time.monotonic()
    loaded = lab_module.load_idle_entries(r1, settings.idle_entries, workdir)
    if not with_snat_sync:
        return loaded, None
    r1_state, r2_state = (node_state_path(workdir, router) for router in lab.routers)
    seen = {}

    def replicated():
        # Injected entries (inject_replicated_entries) go to r2's kernel table,
        # which then counts them, not its external cache.
        seen.update(lab_module.snat_sync_status(r2_state, lab.router_id)[0])
        return max(seen["external_cache"] or 0,
                   lab_module.kernel_entry_count(r2)) >= loaded

    if not lab_module.wait_until(replicated, settings.replication_timeout,
                                 interval=0.5):
        primary = lab_module.snat_sync_status(r1_state, lab.router_id)[0]
        raise lab_module.LabError(
            f"r2 holds {seen.get('external_cache')} of the {loaded} idle entries "
            f"loaded on r1 after {settings.replication_timeout:.0f} s (r1 internal "
            f"cache {primary['internal_cache']}, r2 cache-full drops "
            f"{(seen.get('replication') or {}).get('cache_full_drops')})"
        )
    return loaded, time.monotonic() - started


def crash_primary(lab):
    """Crash r1 and return the seconds until r2 holds the VIPs."""
    r1, r2 = lab.routers
    crashed_at = time.monotonic()
    lab_module.crash_router(lab, r1)
    if not lab_module.wait_until(lambda: lab_module.primary(lab) is r2, timeout=15):
        raise lab_module.LabError("r2 did not take over after r1 crashed")
    return time.monotonic() - crashed_at


def switch_over(lab):
    """Stop r1's keepalived (it gives the VIPs up with a priority-0 advert) and
    return the seconds until r2 holds the VIPs."""
    r1, r2 = lab.routers
    stopped_at = time.monotonic()
    lab_module.stop_process(r1.keepalived)
    if not lab_module.wait_until(lambda: lab_module.primary(lab) is r2, timeout=15):
        raise lab_module.LabError("r2 did not take over after r1's keepalived stopped")
    return time.monotonic() - stopped_at


FAILURES = {"crash": crash_primary, "switchover": switch_over}


def run_scenario(workdir, with_snat_sync, settings=ScenarioSettings(), prefix=None,
                 progress=None):
    """Build a lab in workdir, run the crash scenario and tear everything down.

    progress, when given, is called with one line of text per step.
    """
    say = progress or (lambda line: None)
    workdir = pathlib.Path(workdir)
    with lab_module.running_lab(workdir, prefix=prefix) as lab:
        say(f"lab {lab.prefix}: namespaces {', '.join(lab.namespaces)}")
        for router in lab.routers:
            if settings.router_sysctls:
                lab_module.sysctl(router.namespace, *(
                    f"{key}={value}" for key, value in settings.router_sysctls))
        start_routers(lab, workdir, with_snat_sync, settings)
        say("r1 is primary" + (", snat-sync runs conntrackd on r1 and r2"
                               if with_snat_sync else ""))
        idle_loaded, replication_seconds = 0, None
        if settings.idle_entries:
            idle_loaded, replication_seconds = load_idle_entries(
                lab, workdir, settings, with_snat_sync)
            say(f"{idle_loaded} idle SNAT entries loaded on r1"
                + (f", all on r2 after {replication_seconds:.1f} s"
                   if with_snat_sync else ""))
        r1, r2 = lab.routers[:2]
        burst_file = burst_seconds = backup_at_failure = None
        if settings.burst_entries:
            burst_file = lab_module.write_idle_entries(r1, settings.burst_entries,
                                                       workdir)
        server = start_server(lab, workdir, settings.client_duration + 10)
        client = start_client(lab, workdir, settings)
        say(f"{settings.flows} TCP + {settings.flows} UDP flows running; "
            f"crashing r1 in {settings.crash_after:.0f} s"
            + (f", after a burst of {settings.burst_entries} entries" if burst_file
               else ""))
        time.sleep(settings.crash_after)
        if burst_file is not None:
            loading = time.monotonic()
            lab_module.load_entry_file(r1, burst_file)
            burst_seconds = time.monotonic() - loading
            backup_at_failure = lab_module.kernel_entry_count(r2)
            say(f"burst loaded on r1 in {burst_seconds:.1f} s; r2 holds "
                f"{backup_at_failure} entries")
        failed_at = time.time()  # the wall clock, as the client's started_at
        failover_seconds = FAILURES[settings.failure](lab)
        say(f"r1 {'crashed' if settings.failure == 'crash' else 'stepped down'}; "
            f"r2 primary after {failover_seconds:.2f} s; "
            f"flows run {settings.run_after_crash:.0f} s more")
        wait_for_exit(client, workdir / "client.log", settings.client_duration + 20)
        stop_server(server, workdir / "server.log")
        new_primary_status = new_primary_kernel_entries = None
        if with_snat_sync:
            r2_state = node_state_path(workdir, r2)
            # The takeover reads the table into conntrackd's cache (-R): about
            # 1 s per 100,000 entries, after the data plane is live.
            wait_for_role(r2_state, lab.router_id, "primary",
                          timeout=15 + settings.idle_entries / 20_000)
            new_primary_status = lab_module.snat_sync_status(r2_state, lab.router_id)[0]
            new_primary_kernel_entries = lab_module.kernel_entry_count(r2)
    results, client_report = read_flow_results(workdir)
    return ScenarioResult(
        name=scenario_name(with_snat_sync),
        with_snat_sync=with_snat_sync,
        flows=tuple(results),
        summary=flows.summarize(results),
        failover_seconds=failover_seconds,
        new_primary_status=new_primary_status,
        idle_entries_loaded=idle_loaded,
        idle_replication_seconds=replication_seconds,
        new_primary_kernel_entries=new_primary_kernel_entries,
        failure_at=failed_at - client_report["started_at"],
        burst_load_seconds=burst_seconds,
        backup_entries_at_failure=backup_at_failure,
    )


def stop_server(server, log_path):
    """Ask the flow server to write its report now instead of waiting its duration."""
    server.send_signal(signal.SIGTERM)
    wait_for_exit(server, log_path, timeout=10)


def stop_flows(workdir, client, server):
    """Stop the client (it reports what it saw until now), then the server; the
    flows' results and the client's start time, on its clock."""
    client.send_signal(signal.SIGTERM)
    wait_for_exit(client, workdir / "client.log", 30)
    stop_server(server, workdir / "server.log")
    results, client_report = read_flow_results(workdir)
    return results, client_report["started_at"]


# --- presentation ---------------------------------------------------------------------


def format_table(results):
    """The comparison table, one row per scenario."""
    header = (
        "scenario", "TCP alive", "UDP alive (same public port)",
        "longest gap TCP / UDP", "failover",
    )
    rows = [header]
    for result in results:
        summary = result.summary
        rows.append((
            result.name,
            f"{summary.tcp_alive}/{summary.tcp_total}",
            f"{summary.udp_alive_same_endpoint}/{summary.udp_total}",
            f"{seconds(summary.tcp_longest_gap_ms, summary.tcp_alive)} / "
            f"{seconds(summary.udp_longest_gap_ms, summary.udp_alive)}",
            f"{result.failover_seconds:.2f} s",
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in rows
    )


def seconds(milliseconds, alive):
    """A gap in seconds, or "-" when no flow survived to have one."""
    return f"{milliseconds / 1000:.2f} s" if alive else "-"


def describe_transition(result):
    """One line on what snat-sync did on the new primary, or None without snat-sync."""
    transition = result.last_transition
    if not transition:
        return None
    steps = ", ".join(
        f"{step['name']} skipped" if step.get("skipped")
        else f"{step['name']} {step['duration_ms']:.1f} ms"
        for step in transition["steps"]
    )
    commit = transition.get("commit") or {}
    committed = ""
    if commit.get("committed") is not None:
        committed = (
            f"; committed {commit['committed']} entries, {commit.get('failed')} failed"
        )
    outcome = f"{transition['role']} transition {transition['outcome']}"
    return f"r2 {outcome}: {steps}{committed}"


# --- running the demo -----------------------------------------------------------------


def missing_prerequisites():
    """Why the demo cannot run here, or an empty list."""
    problems = []
    if os.geteuid() != 0:
        problems.append(
            "it must run as root: it creates network namespaces, veth pairs, "
            "bridges and iptables rules (inside its own namespaces only)"
        )
    missing = [binary for binary in REQUIRED_BINARIES if shutil.which(binary) is None]
    if missing:
        problems.append(f"missing programs: {', '.join(missing)}")
    return problems


def run_demo(flows=DEFAULT_FLOWS, workdir=None, out=sys.stdout):
    """Run both scenarios, print progress and the table to out; return the results."""
    settings = ScenarioSettings(flows=flows)

    def say(line):
        print(f"  {line}", file=out, flush=True)

    with contextlib.ExitStack() as cleanup:
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="snat-sync-demo-")
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        results = []
        for with_snat_sync in (False, True):
            name = scenario_name(with_snat_sync)
            print(f"scenario: {name}", file=out, flush=True)
            results.append(
                run_scenario(
                    pathlib.Path(workdir) / name.replace(" ", "-"),
                    with_snat_sync,
                    settings,
                    progress=say,
                )
            )
    print(file=out)
    print(format_table(results), file=out)
    for result in results:
        line = describe_transition(result)
        if line:
            print(line, file=out)
    return results


@contextlib.contextmanager
def interrupts_raise():
    """Turn SIGTERM (and SIGINT) into KeyboardInterrupt once, so that every `finally`
    and context manager on the way out tears the labs down; a second signal during
    the teardown is ignored rather than allowed to cut it short."""

    def interrupted(signal_number, frame):
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signal_number).name)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {each: signal.getsignal(each) for each in handled}
    for each in previous:
        signal.signal(each, interrupted)
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


def main(flows=DEFAULT_FLOWS):
    """Run the demo; exit status 0 when snat-sync kept every flow, 1 when it did
    not, 2 when the demo cannot run here, 130 when interrupted."""
    problems = missing_prerequisites()
    if problems:
        for problem in problems:
            print(f"snat-sync demo: {problem}", file=sys.stderr)
        return 2
    try:
        with interrupts_raise():
            results = run_demo(flows=flows)
    except KeyboardInterrupt:
        print("snat-sync demo: interrupted; everything it built was removed",
              file=sys.stderr)
        return 130
    except lab_module.LabError as error:
        print(f"snat-sync demo: {error}", file=sys.stderr)
        return 1
    protected = next(result for result in results if result.with_snat_sync).summary
    kept_all = (
        protected.tcp_alive == protected.tcp_total
        and protected.udp_alive_same_endpoint == protected.udp_total
    )
    return 0 if kept_all else 1


def command_line(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m snat_sync.lab.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--flows", type=int, default=DEFAULT_FLOWS,
                        help=f"TCP flows and UDP flows each (default {DEFAULT_FLOWS})")
    return main(flows=parser.parse_args(argv).flows)


if __name__ == "__main__":
    sys.exit(command_line())
