"""The fault soak (issue 14): one router under load on two or three nodes, a seeded
schedule of faults, and after each fault the checks that say whether anything was
lost.

The load, the whole time: every node runs `snat-sync daemon` and keepalived, the
primary holds idle SNAT entries (lab.load_idle_entries), long-lived TCP and UDP
flows whose source ports collide run through it (lab.flows, with snapshots), and
a churn of short new UDP flows (lab.churn) keeps its table changing. Three nodes
(r1, r2, r3: priorities 150, 100, 50) sync by multicast, as [conntrackd]
sync_mode = auto has it for a router with several peers.

The faults (KINDS), due every 20-40 s (SPACING: between the moments two faults
are due; a fault starts when it is due or, if the one before is still being
checked, as soon as that one's checks are done):
    crash-keep-table        the primary's node dies, its namespace and table stay;
                            it returns with that old table
    crash-flushed           the primary's node dies and returns after a reboot
                            (table empty)
    switchover              the primary's keepalived stops (priority-0 advert) and
                            starts again: the planned move of the VIPs
    kill-conntrackd-primary kill -9 of conntrackd on the primary
    kill-conntrackd-backup  kill -9 of conntrackd on a backup
    kill-daemon             kill -9 of a node's daemon (its process group), started
                            again
    partition               the primary's HA link drops everything for 1-10 s
    sync-loss               20% of the sync packets dropped on every node for 30 s
    notify-storm            a backup's notify hook fired 20 times, MASTER and
                            BACKUP in a seeded order, ending BACKUP, as a flapping
                            keepalived fires it
    sighup                  SIGHUP to a node's daemon (`systemctl reload`)
    router-add-again        `router add` again on a node with the same arguments
On three nodes, "a backup" is one of the two, drawn from the fault's seed
(pick_backup), and whichever node the election makes primary takes over.

After each fault (checks): every long-lived flow has answered since the fault
ended, without an error and from its one public endpoint; the settled primary's
table holds every idle entry the primary held before, right after the fault and
again once every node is in-sync; every node's `status` verdict is in-sync, all
of them in one moment, within IN_SYNC_BOUND of the fault's end; and then nothing
is left over: one conntrackd per router namespace (the one status names, its
lock file and control socket present), one daemon per node, no other process
lingering in a router namespace. The checks that wait (for a settled primary,
the flows, the verdicts) wait at once, not one after the other (run_fault);
each node's verdict is read every STATUS_POLL seconds by one long-running
`status` poller per node (lab.status_poll) rather than one command per reading.

Decisions are pure and unit-tested (tests/test_soak.py): draw_schedule, the
judging of flows and tables, when a primary has settled and when every verdict
is in-sync, the rows and the last line. Effects are the thin functions below
them; bench/soak.py is the command line.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import random
import shlex
import signal
import subprocess
import threading
import time

import psutil

from snat_sync.lab import nodes as nodes_module
from snat_sync.lab import topology

KINDS = (
    "crash-keep-table", "crash-flushed", "switchover", "kill-conntrackd-primary",
    "kill-conntrackd-backup", "kill-daemon", "partition", "sync-loss",
    "notify-storm", "sighup", "router-add-again",
)
# Where a fault hits: these kinds pick either node, from the seed; the others
# always hit the node NODE_OF names.
EITHER_NODE = ("kill-daemon", "sighup", "router-add-again")
NODE_OF = {"kill-conntrackd-backup": "backup", "notify-storm": "backup",
           "sync-loss": "all"}
SPACING = (20.0, 40.0)
PARTITION_SECONDS = (1.0, 10.0)
SYNC_LOSS_SECONDS = 30.0
SYNC_LOSS_PROBABILITY = 0.2
STORM_HOOKS = 20
SUPPORTED_NODES = (2, 3)

# Bounds of the checks, in seconds.
FAILOVER_BOUND = 15.0
RETURN_AFTER = 3.0  # a crashed node comes back this long after the VIPs moved
FLOW_BOUND = 25.0  # TCP retries 6.2 s and 12.6 s after a loss
# The primary counts as settled once it has held the VIPs alone this long (VRRP's
# detection time with advert_int 1 and a second): right after a partition heals
# the VIPs may still be moving, and a table counted then is the loser's.
STABLE_PRIMARY = 4.0
IN_SYNC_BOUND = 90.0
STRAY_SAMPLE_GAP = 4.0  # a process still there after this long is stray
PRIMARY_SAMPLE = 0.2  # seconds between the samples of who holds the VIPs
STATUS_POLL = 0.5  # seconds between the status readings of each node
STATUS_FRESH = 2.0  # a reading older than this is not a node's verdict now
HOOK_BOUND = 120.0
SYNC_BASE_PORT = 3780  # [conntrackd] base_port's default
CHURN_PORT = 9001
# Both routers answer on one MAC per port, as Neutron's do. When a partition makes
# the backup primary for a moment, its gratuitous ARPs teach the switch that MAC
# on the backup's ports; the primary, which never left MASTER, sends none, and
# every flow stalls until the next VRRP change (seen in the soak: 40 s, all 32
# flows). keepalived's garp_lower_prio_repeat makes the primary announce itself
# again when it hears the lower-priority advert.
KEEPALIVED_INSTANCE_LINES = ("    garp_lower_prio_repeat 1",)


# --- the schedule (pure) --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault of the schedule: its kind, when it is due (seconds after the soak
    started), which node it hits ("primary", "backup" or "all") and, for a
    partition or a sync loss, for how long."""

    kind: str
    at: float
    node: str = "primary"
    seconds: float = 0.0
    seed: int = 0  # the notify storm's order


def check_node_count(count):
    """The soak runs on a router pair or on a router of three nodes (the lab's
    and Neutron's max_l3_agents_per_router); refuse other node counts clearly."""
    if count not in SUPPORTED_NODES:
        raise ValueError(
            f"--nodes {count}: the soak runs on "
            f"{' or '.join(map(str, SUPPORTED_NODES))} nodes only (the lab's "
            "router has two or three)")
    return count


def pick_backup(backups, seed):
    """The backup a fault hits among the backups' names (two of them on three
    nodes): drawn from the fault's seed, reproducibly."""
    ordered = sorted(backups)
    return ordered[seed % len(ordered)]


def draw_fault(kind, at, chooser):
    node = (chooser.choice(("primary", "backup")) if kind in EITHER_NODE
            else NODE_OF.get(kind, "primary"))
    seconds = {"partition": round(chooser.uniform(*PARTITION_SECONDS), 1),
               "sync-loss": SYNC_LOSS_SECONDS}.get(kind, 0.0)
    # rounded down to 0.1 s: a fault never moves past the end of its soak
    return Fault(kind, math.floor(at * 10) / 10, node, seconds,
                 chooser.randrange(2**31))


def draw_schedule(seed, minutes, kinds=KINDS, spacing=SPACING, copies=2):
    """The faults of a soak of `minutes`, reproducible from `seed`.

    Every kind appears `copies` times first, in a shuffled order, then kinds drawn
    at random until the time is used. Faults are `spacing` seconds apart (drawn
    uniformly), the first one gap after the start, the last no later than one
    minimum gap before the end, so that it has time to settle. Coverage: when the
    covering faults do not fit with the gaps drawn, their gaps are shrunk towards
    the minimum until they do, so every kind appears `copies` times whenever
    copies x len(kinds) + 1 minimum gaps fit in the soak (a 10-minute soak: 23 x
    20 s = 460 s of 600 s); when even that does not fit, the gaps stay as drawn
    and the shuffled order is cut.
    """
    chooser = random.Random(seed)
    lowest, highest = spacing
    budget = minutes * 60.0 - lowest
    covering = [kind for kind in kinds for _ in range(copies)]
    chooser.shuffle(covering)
    gaps = [chooser.uniform(lowest, highest) for _ in covering]
    floor = lowest * len(gaps)
    if floor <= budget < sum(gaps):
        shrink = (budget - floor) / (sum(gaps) - floor)
        gaps = [lowest + (gap - lowest) * shrink for gap in gaps]
    schedule, at = [], 0.0
    for kind, gap in zip(covering, gaps):
        at += gap
        if at > budget + 1e-6:
            return schedule
        schedule.append(draw_fault(kind, at, chooser))
    while (at := at + chooser.uniform(lowest, highest)) <= budget:
        schedule.append(draw_fault(chooser.choice(kinds), at, chooser))
    return schedule


# --- judging (pure) -------------------------------------------------------------------


def lost_flows(client, server, since):
    """The flow ids a snapshot pair shows lost: an error (a reset, EOF), a second
    public endpoint seen by the server or echoed to the client, or no reply since
    `since` (seconds on the client's clock)."""
    endpoints = {flow["flow_id"]: flow["public_endpoints"]
                 for flow in server.get("flows", [])}
    lost = []
    for flow in client.get("flows", []):
        last = flow.get("last_reply_at")
        if (flow.get("error") or len(endpoints.get(flow["flow_id"], ())) > 1
                or len(flow.get("echoed_public_endpoints", ())) > 1
                or last is None or last <= since):
            lost.append(flow["flow_id"])
    return sorted(lost)


def loss_reasons(client, server, flow_ids, since):
    """{flow id: why it counts lost}: its error, "new public port", or
    "silent" (no reply since `since`, no error: a stall)."""
    endpoints = {flow["flow_id"]: flow["public_endpoints"]
                 for flow in server.get("flows", [])}
    reasons = {}
    for flow in client.get("flows", []):
        flow_id = flow["flow_id"]
        if flow_id not in flow_ids:
            continue
        if flow.get("error"):
            reasons[flow_id] = flow["error"]
        elif (len(endpoints.get(flow_id, ())) > 1
              or len(flow.get("echoed_public_endpoints", ())) > 1):
            reasons[flow_id] = "new public port"
        else:
            reasons[flow_id] = "silent"
    return reasons


def silent_flows(client, since):
    """Flows without an error that have not answered since `since`: still waited
    for."""
    silent = []
    for flow in client.get("flows", []):
        last = flow.get("last_reply_at")
        if not flow.get("error") and (last is None or last <= since):
            silent.append(flow["flow_id"])
    return sorted(silent)


def entries_lost(expected, *held):
    """Idle entries the primary lacks against what the primary held before, at
    the worst of the counts taken (None: no primary to count)."""
    if not held or None in held:
        return expected
    return max(0, expected - min(held))


def soak_moments(client, flow_ids, soak_started_at):
    """{flow id: its last reply, in seconds since the soak started} for flow_ids:
    when a lost flow went silent."""
    moments = {}
    for flow in client.get("flows", []):
        if flow["flow_id"] in flow_ids and flow.get("last_reply_at") is not None:
            moments[flow["flow_id"]] = round(
                client["started_at"] + flow["last_reply_at"] - soak_started_at, 1)
    return moments


def describe_losses(moments, reasons):
    """"tcp-02 ConnectionResetError 195.3 s, ..." (the flow's last reply, in
    seconds since the soak started) in order of the moments."""
    ordered = sorted(moments.items(), key=lambda item: (item[1], item[0]))
    return ", ".join(f"{flow_id} {reasons.get(flow_id, '?')} {at:.1f} s"
                     for flow_id, at in ordered)


def follow_holder(run, holder, now):
    """The run of one VIP holder, (holder, since), after a sample at `now` that
    found `holder` (None: nobody, or more than one node)."""
    if run is None or run[0] != holder:
        return (holder, now)
    return run


def settled_holder(run, now, stable=STABLE_PRIMARY):
    """The holder of the run if it has held the VIPs for `stable` seconds."""
    if run is None or run[0] is None or now - run[1] < stable:
        return None
    return run[0]


def verdicts_in_sync(readings, names, since, now, fresh=STATUS_FRESH):
    """Whether the latest status reading of every node in names says in-sync,
    each taken after `since` (the fault's end) and at most `fresh` seconds ago
    (so that the readings are about one moment, and a stuck poller's last
    verdict does not count). readings: {name: {"taken": epoch, "verdict": ...}}."""
    for name in names:
        reading = readings.get(name)
        if (reading is None or reading.get("verdict") != "in-sync"
                or not since <= reading["taken"] <= now
                or now - reading["taken"] > fresh):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one fault did: started (seconds after the soak started), the primary
    before and after, the flows lost after it (all lost so far), the idle
    entries expected, held by the primary right after the fault and once every
    node was in-sync (or the bound passed), seconds until every node was
    in-sync (None: not within the bound), and what else went wrong."""

    fault: Fault
    started: float
    primary_before: str | None
    primary_after: str | None
    flows_total: int
    flows_lost: tuple
    idle_expected: int
    idle_held: int | None
    in_sync_seconds: float | None
    problems: tuple = ()
    idle_settled: int | None = None

    @property
    def failover(self):
        return self.primary_before != self.primary_after

    @property
    def entries_lost(self):
        return entries_lost(self.idle_expected, self.idle_held, self.idle_settled)


ROW_HEADER = ("fault", "node", "at", "failover", "flows alive",
              "table on primary", "in-sync after", "problems")


def row(outcome):
    fault = outcome.fault
    kind = fault.kind + (f" {fault.seconds:.1f}s" if fault.seconds else "")
    failover = (f"{outcome.primary_before}->{outcome.primary_after}"
                if outcome.failover else "no")
    alive = outcome.flows_total - len(outcome.flows_lost)
    held = "-" if outcome.idle_held is None else str(outcome.idle_held)
    if outcome.idle_settled != outcome.idle_held:
        held += " then " + ("-" if outcome.idle_settled is None
                            else str(outcome.idle_settled))
    in_sync = ("no" if outcome.in_sync_seconds is None
               else f"{outcome.in_sync_seconds:.1f} s")
    return (kind, fault.node, f"{outcome.started:.0f} s", failover,
            f"{alive}/{outcome.flows_total}", f"{held}/{outcome.idle_expected}",
            in_sync, "; ".join(outcome.problems) or "-")


# Fixed column widths: the rows are printed one at a time, as the faults end.
ROW_WIDTHS = (24, 7, 6, 8, 11, 22, 13, 0)


def format_row(cells):
    return "  ".join(cell.ljust(width)
                     for cell, width in zip(cells, ROW_WIDTHS)).rstrip()


def summary(outcomes):
    """(faults, failovers, flows lost, entries lost) over the whole soak: a flow
    lost once counts once; entries count at each fault that lost them."""
    lost = set()
    for outcome in outcomes:
        lost.update(outcome.flows_lost)
    return (len(outcomes), sum(outcome.failover for outcome in outcomes), len(lost),
            sum(outcome.entries_lost for outcome in outcomes))


def summary_line(outcomes):
    faults, failovers, flows_lost, lost_entries = summary(outcomes)
    return (f"{faults} faults, {failovers} failovers, {flows_lost} flows lost, "
            f"{lost_entries} entries lost")


def exit_status(outcomes):
    """0 when nothing was lost and every fault settled; 1 otherwise."""
    _, _, flows_lost, lost_entries = summary(outcomes)
    unsettled = any(outcome.in_sync_seconds is None or outcome.problems
                    for outcome in outcomes)
    return 1 if flows_lost or lost_entries or unsettled else 0


# --- the soak's lab (effects) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 1
    minutes: float = 10.0
    idle_entries: int = 100_000
    flows: int = 16  # TCP flows and UDP flows each
    churn_rate: float = 2000.0
    nodes: int = 2
    kinds: tuple = KINDS
    spacing: tuple = SPACING
    copies: int = 2
    advert_int: int = 1
    # Run a fault even when the ones before it pushed it past the soak's minutes
    # (a test that must run its whole schedule); otherwise it is not run.
    run_late_faults: bool = False


@dataclasses.dataclass
class Soak:
    """The running soak: the lab, its nodes ({name: Node}), where the flow
    snapshots are, and the clock."""

    lab: topology.Lab
    nodes: dict
    workdir: pathlib.Path
    started: float  # time.monotonic() at the first fault's countdown
    flow_count: int
    idle_expected: int
    started_at: float = 0.0  # the same moment, time.time()
    lost: set = dataclasses.field(default_factory=set)  # flows lost so far

    def primary(self):
        router = topology.primary(self.lab)
        return self.nodes[router.name] if router else None

    def others(self, node):
        return [other for other in self.nodes.values() if other is not node]


def start_soak(lab, workdir, settings, say):
    """Every node up with its daemon and a status poller, the idle entries on r1
    and replicated to the backups, the flows, their server and the churn
    running. Returns the Soak."""
    workdir = pathlib.Path(workdir)
    check_node_count(settings.nodes)
    configs = {router.name: nodes_module.write_config(workdir / f"{router.name}.conf")
               for router in lab.routers}
    for router in lab.routers:
        router.keepalived_instance_lines = KEEPALIVED_INSTANCE_LINES
    started = nodes_module.start_nodes(lab, workdir, configs, settings.advert_int)
    for node in started.values():
        start_status_poller(lab, workdir, node)
    r1, *backups = lab.routers
    names = ", ".join(backup.name for backup in backups)
    say(f"lab {lab.prefix}: r1 primary, {names} backup, a daemon on each")
    loaded = topology.load_idle_entries(r1, settings.idle_entries, workdir)
    for backup in backups:
        if not topology.wait_until(
                lambda: topology.idle_entry_count(backup) >= loaded, 120, 1):
            raise topology.LabError(
                f"{backup.name} does not hold the {loaded} idle entries of r1")
    say(f"{loaded} idle entries on r1, replicated to {names}")
    duration = settings.minutes * 60 + 600  # outlives the soak; stopped by pid
    topology.run(["iptables", "-A", "INPUT", "-p", "udp", "--dport", str(CHURN_PORT),
                  "-j", "DROP"], namespace=lab.server_namespace)
    start_flows(lab, workdir, settings.flows, duration)
    topology.start_process(lab, lab.client_namespace, topology.python_module(
        "snat_sync.lab.churn", "--server", topology.SERVER_ADDRESS,
        "--port", CHURN_PORT, "--rate", settings.churn_rate, "--duration", duration,
        "--output", workdir / "churn.json"), workdir / "churn.log")
    soak = Soak(lab, started, workdir, time.monotonic(), 2 * settings.flows, loaded)
    if not topology.wait_until(lambda: not still_silent(soak, 0.0), FLOW_BOUND, 0.5):
        raise topology.LabError(f"flows never answered: {still_silent(soak, 0.0)}")
    say(f"{2 * settings.flows} long-lived flows and {settings.churn_rate:.0f} new "
        "flows/s running")
    soak.started, soak.started_at = time.monotonic(), time.time()
    return soak


def start_flows(lab, workdir, count, duration):
    ready = workdir / "server.ready"
    topology.start_process(lab, lab.server_namespace, topology.python_module(
        "snat_sync.lab.flows", "server", "--address", topology.SERVER_ADDRESS,
        "--duration", duration, "--ready-file", ready,
        "--output", workdir / "server.json",
        "--snapshot", workdir / "server-snapshot.json"), workdir / "server.log")
    if not topology.wait_until(ready.exists, 10):
        raise topology.LabError("flow server did not start: "
                                + topology.read_tail(workdir / "server.log"))
    topology.start_process(lab, lab.client_namespace, topology.python_module(
        "snat_sync.lab.flows", "client", "--server", topology.SERVER_ADDRESS,
        "--addresses", ",".join(topology.CLIENT_ADDRESSES),
        "--tcp-flows", count, "--udp-flows", count, "--duration", duration,
        "--output", workdir / "client.json",
        "--snapshot", workdir / "client-snapshot.json"), workdir / "client.log")


def read_json(path):
    with contextlib.suppress(OSError, ValueError):
        return json.loads(pathlib.Path(path).read_text())
    return {}


def snapshots(soak):
    return (read_json(soak.workdir / "client-snapshot.json"),
            read_json(soak.workdir / "server-snapshot.json"))


def client_moment(client, wall):
    """A wall-clock moment on the client's clock."""
    return wall - client.get("started_at", wall)


def still_silent(soak, wall):
    client, _ = snapshots(soak)
    if not client.get("flows"):
        return ["(no snapshot)"]
    return silent_flows(client, client_moment(client, wall))


def wait_for_flows(soak, since_wall):
    """Wait (FLOW_BOUND) until every flow answered after since_wall; the flows
    lost."""
    topology.wait_until(lambda: not still_silent(soak, since_wall), FLOW_BOUND, 0.5)
    client, server = snapshots(soak)
    return lost_flows(client, server, client_moment(client, since_wall))


# --- the faults (effects) -------------------------------------------------------------


def wait_for_vip_to_leave(soak, old):
    """Wait until another node alone holds the VIPs (with three nodes, whichever
    of the two the election makes primary)."""
    def moved():
        holder = soak.primary()
        return holder is not None and holder is not old

    if not topology.wait_until(moved, FAILOVER_BOUND):
        raise topology.LabError(f"no other node took the VIPs from {old.name}")


def one_primary(soak):
    if not topology.wait_until(soak.primary, FAILOVER_BOUND):
        raise topology.LabError("no single primary")
    return soak.primary()


class PrimaryWatch:
    """Who holds the VIPs, sampled every PRIMARY_SAMPLE seconds in a thread from
    the fault's end until the checks are done: the run of the current holder
    (follow_holder) tells at any moment whether a primary has settled, so the
    checks after the fault wait for it at the same time as for the flows and the
    verdicts, not one after the other."""

    def __init__(self, soak):
        self.soak = soak
        self.run = None  # (holder's name or None, since: time.monotonic())
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.follow, daemon=True)

    def __enter__(self):
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.thread.join()

    def sample(self):
        holder = self.soak.primary()
        now = time.monotonic()
        with self.lock:
            self.run = follow_holder(self.run, holder.name if holder else None, now)

    def follow(self):
        while not self.stopped.wait(PRIMARY_SAMPLE):
            self.sample()

    def settled(self, timeout=FAILOVER_BOUND + STABLE_PRIMARY):
        """The node that has held the VIPs alone for STABLE_PRIMARY seconds, or
        None if none did within timeout."""
        def holder():
            with self.lock:
                name = settled_holder(self.run, time.monotonic())
            return self.soak.nodes[name] if name else None
        return topology.wait_until(holder, timeout, PRIMARY_SAMPLE)


def crash(soak, fault, keep_table):
    old = one_primary(soak)
    if keep_table:
        nodes_module.die_keeping_table(soak.lab, old)
    else:
        nodes_module.crash_node(soak.lab, old)
    wait_for_vip_to_leave(soak, old)
    time.sleep(RETURN_AFTER)
    nodes_module.return_node(soak.lab, old, flush=not keep_table)


def switchover(soak, fault):
    old = one_primary(soak)
    topology.stop_process(old.router.keepalived)
    wait_for_vip_to_leave(soak, old)
    topology.start_keepalived(soak.lab, old.router, old.notify_command)


def conntrackd_processes(node):
    return topology.named_processes_in_namespace(node.router.namespace, "conntrackd")


def kill_conntrackd(soak, fault):
    node = target(soak, fault)
    victims = conntrackd_processes(node)
    topology.kill_processes(victims)
    old = {process.pid for process in victims}
    if not topology.wait_until(
            lambda: {each.pid for each in conntrackd_processes(node)} - old, 15):
        raise topology.LabError(f"{node.name}'s daemon did not restart conntrackd")


def kill_daemon(soak, fault):
    node = target(soak, fault)
    nodes_module.kill_daemon(node)
    nodes_module.start_daemon(soak.lab, node)


def ha_drop(node, action):
    for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
        topology.run(["iptables", action, chain, direction, node.router.ha.device,
                      "-j", "DROP"], namespace=node.router.namespace)


def partition(soak, fault):
    node = one_primary(soak)
    ha_drop(node, "-I")
    try:
        time.sleep(fault.seconds)
    finally:
        ha_drop(node, "-D")
    one_primary(soak)


def sync_loss_rules(soak, node, action):
    port = SYNC_BASE_PORT + soak.lab.vrid
    for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
        topology.run(["iptables", action, chain, direction, node.router.ha.device,
                      "-p", "udp", "-m", "multiport", "--ports", str(port),
                      "-m", "statistic", "--mode", "random",
                      "--probability", str(SYNC_LOSS_PROBABILITY), "-j", "DROP"],
                     namespace=node.router.namespace)


def sync_loss(soak, fault):
    for node in soak.nodes.values():
        sync_loss_rules(soak, node, "-A")
    try:
        time.sleep(fault.seconds)
    finally:
        for node in soak.nodes.values():
            sync_loss_rules(soak, node, "-D")


def storm_states(seed, hooks=STORM_HOOKS, last="BACKUP"):
    """keepalived states for a notify storm, in a seeded order, ending with last."""
    chooser = random.Random(seed)
    return [chooser.choice(("MASTER", "BACKUP")) for _ in range(hooks - 1)] + [last]


def has_taken_arrival_time(process):
    """Whether a fired hook has read its arrival time (its first step): past it,
    it runs flock or has exec'd snat-sync. Firing the next hook only then makes
    the arrival order the firing order, as keepalived's transitions are ordered,
    however slowly a loaded machine starts bash."""
    try:
        hook = psutil.Process(process.pid)
        return bool(hook.children()) or "snat_sync" in hook.cmdline()
    except psutil.Error:
        return True  # it has run through already


def notify_storm(soak, fault):
    node = target(soak, fault)
    hook = shlex.split(node.notify_command)
    pauses = random.Random(fault.seed + 1)
    hooks = []
    try:
        for state in storm_states(fault.seed):
            process = subprocess.Popen(
                ["ip", "netns", "exec", node.router.namespace, *hook,
                 "INSTANCE", f"VR_{soak.lab.vrid}", state, "100"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
            hooks.append(process)
            topology.wait_until(lambda: has_taken_arrival_time(process), 10, 0.002)
            time.sleep(pauses.uniform(0.02, 0.06))
        for each in hooks:
            each.wait(timeout=HOOK_BOUND)
    finally:
        for each in hooks:
            topology.stop_process(each)


def reload_daemon(soak, fault):
    """SIGHUP to the daemon's own pid, as `systemctl reload` (kill -HUP $MAINPID)."""
    node = target(soak, fault)
    os.kill(node.daemon.pid, signal.SIGHUP)


def router_add_again(soak, fault):
    node = target(soak, fault)
    topology.snat_sync_router_add(soak.lab, node.router, node.state_path,
                                  *node.global_arguments)


def target(soak, fault):
    primary = one_primary(soak)
    if fault.node == "primary":
        return primary
    return soak.nodes[pick_backup([node.name for node in soak.others(primary)],
                                  fault.seed)]


EFFECTS = {
    "crash-keep-table": lambda soak, fault: crash(soak, fault, keep_table=True),
    "crash-flushed": lambda soak, fault: crash(soak, fault, keep_table=False),
    "switchover": switchover,
    "kill-conntrackd-primary": kill_conntrackd,
    "kill-conntrackd-backup": kill_conntrackd,
    "kill-daemon": kill_daemon,
    "partition": partition,
    "sync-loss": sync_loss,
    "notify-storm": notify_storm,
    "sighup": reload_daemon,
    "router-add-again": router_add_again,
}


# --- the checks (effects) -------------------------------------------------------------


def status_path(workdir, node):
    """Where node's status poller keeps its latest reading."""
    return workdir / f"status-{node.name}.json"


def start_status_poller(lab, workdir, node):
    """`snat-sync status ROUTER --json` for node, run every STATUS_POLL seconds
    in one process (lab.status_poll), its latest reading in the workdir; kept in
    lab.processes."""
    command = topology.snat_sync_argv(node.state_path, *node.global_arguments,
                                      "status", lab.router_id, "--json")
    program = topology.python_module("snat_sync")
    argv = topology.python_module(
        "snat_sync.lab.status_poll", "--output", status_path(workdir, node),
        "--interval", STATUS_POLL, "--", *command[len(program):])
    with open(workdir / f"status-poll-{node.name}.log", "ab") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=topology.package_environment(), start_new_session=True)
    lab.processes.append(process)
    return process


def node_status(soak, node):
    """The node's latest status reading: its router's status with "taken" (the
    reading's wall-clock time); verdict "unreadable" when the command said
    nothing readable, None when there is no reading yet."""
    found = read_json(status_path(soak.workdir, node))
    if "taken" not in found:
        return None
    with contextlib.suppress(TypeError, IndexError, KeyError):
        return {**found["status"][0], "taken": found["taken"]}
    return {"taken": found["taken"], "verdict": "unreadable",
            "reason": f"exit {found.get('exit')}: {found.get('stderr', '')}"[-300:]}


def wait_for_in_sync(soak, since):
    """Seconds from `since` (the fault's end, wall clock) until every node's
    status said in-sync (verdicts_in_sync; None: not within IN_SYNC_BOUND), and
    the last status of each node. Every verdict that is not in-sync goes to
    status-trace.jsonl in the workdir, once per reading, for the diagnosis."""
    last, traced = {}, {}
    names = list(soak.nodes)

    def all_in_sync():
        for node in soak.nodes.values():
            status = node_status(soak, node)
            if status is not None:
                last[node.name] = status
        with open(soak.workdir / "status-trace.jsonl", "a") as trace:
            for name, status in last.items():
                if (status.get("verdict") != "in-sync"
                        and traced.get(name) != status["taken"]):
                    traced[name] = status["taken"]
                    trace.write(json.dumps({
                        "at": round(status["taken"] - soak.started_at, 1),
                        "node": name, "verdict": status.get("verdict"),
                        "reason": status.get("reason"),
                        "problems": status.get("problems")}) + "\n")
        return verdicts_in_sync(last, names, since, time.time())

    if topology.wait_until(all_in_sync, IN_SYNC_BOUND, STATUS_POLL / 2):
        return round(time.time() - since, 1), last
    return None, last


def daemon_processes(node):
    """Processes running `snat_sync ... daemon` over node's state path."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if ("daemon" in command and "snat_sync" in command
                and str(node.state_path) in command):
            found.append(process.pid)
    return found


def lingering(node):
    """pids in node's router namespace other than keepalived and conntrackd."""
    pids = set()
    for process in topology.processes_in_namespace(node.router.namespace):
        with contextlib.suppress(psutil.Error):
            if process.name() not in ("keepalived", "conntrackd"):
                pids.add((process.pid, " ".join(process.cmdline())[:80]))
    return pids


def statuses_after(soak, moment, timeout=STATUS_FRESH + STATUS_POLL):
    """Every node's latest status reading once it was taken after `moment` (wall
    clock); a node whose poller took none within timeout is left out."""
    found = {}

    def all_read():
        for node in soak.nodes.values():
            status = node_status(soak, node)
            if status is not None and status["taken"] >= moment:
                found[node.name] = status
        return len(found) == len(soak.nodes)

    topology.wait_until(all_read, timeout, STATUS_POLL / 2)
    return found


def leftovers(soak, first):
    """What is left over once every node settled: more or fewer conntrackd than
    one, one the status does not name (a reading taken after the processes were
    listed: the in-sync one may have seen a conntrackd that was still
    daemonizing), its lock or socket missing, more or fewer daemons than one,
    processes that linger in a router namespace (in `first`, sampled
    STRAY_SAMPLE_GAP seconds before, and still there)."""
    problems = []
    listed = time.time()
    conntrackds = {node.name: [process.pid for process in conntrackd_processes(node)]
                   for node in soak.nodes.values()}
    statuses = statuses_after(soak, listed)
    for node in soak.nodes.values():
        pids = conntrackds[node.name]
        status = statuses.get(node.name, {})
        if len(pids) != 1:
            problems.append(f"{node.name}: {len(pids)} conntrackd")
        elif status.get("conntrackd_pid") not in (None, pids[0]):
            problems.append(f"{node.name}: conntrackd {pids[0]} but status names "
                            f"{status.get('conntrackd_pid')}")
        directory = node.state_path / "routers" / soak.lab.router_id
        for name in ("conntrackd.lock", "conntrackd.ctl"):
            if pids and not (directory / name).exists():
                problems.append(f"{node.name}: {name} missing")
        daemons = daemon_processes(node)
        if daemons != [node.daemon.pid]:
            problems.append(f"{node.name}: daemons {daemons}, expected "
                            f"[{node.daemon.pid}]")
        stray = first[node.name] & lingering(node)
        if stray:
            problems.append(f"{node.name}: lingering {sorted(stray)}")
    return problems


def settled_table(watch):
    """The settled primary and the idle entries it holds (None, None: none
    settled)."""
    primary = watch.settled()
    return primary, topology.idle_entry_count(primary.router) if primary else None


def run_fault(soak, fault):
    """Apply one fault, then check; the Outcome.

    The checks that wait run at once, from the fault's end: a settled primary
    and its table, the flows, every node's verdict. Once all three are done,
    the first sample of what lingers, the table counted again on a primary
    settled by then, and the second sample STRAY_SAMPLE_GAP after the first."""
    started = round(time.monotonic() - soak.started, 1)
    before = soak.primary()
    problems = []
    try:
        EFFECTS[fault.kind](soak, fault)
    except (topology.LabError, subprocess.SubprocessError, OSError) as error:
        problems.append(f"fault: {error}"[:300])
    ended = time.time()
    with (PrimaryWatch(soak) as watch,
          concurrent.futures.ThreadPoolExecutor(3) as pool):
        table = pool.submit(settled_table, watch)
        flows = pool.submit(wait_for_flows, soak, ended)
        verdicts = pool.submit(wait_for_in_sync, soak, ended)
        after, held = table.result()
        lost = flows.result()
        in_sync, statuses = verdicts.result()
        first = {node.name: lingering(node) for node in soak.nodes.values()}
        sampled = time.monotonic()
        settled, held_settled = settled_table(watch)
        time.sleep(max(0.0, sampled + STRAY_SAMPLE_GAP - time.monotonic()))
    client, server = snapshots(soak)
    reasons = loss_reasons(client, server, set(lost), client_moment(client, ended))
    moments = soak_moments(client, set(lost), soak.started_at)
    if in_sync is None:
        problems += [f"{name}: {status.get('verdict')}: {status.get('reason')}"[:300]
                     for name, status in statuses.items()
                     if status.get("verdict") != "in-sync"]
        problems += [f"{name}: no status reading" for name in soak.nodes
                     if name not in statuses]
    new_losses = set(lost) - soak.lost
    if new_losses:
        problems.append("lost (last reply): " + describe_losses(
            {flow_id: moments[flow_id] for flow_id in new_losses
             if flow_id in moments}, reasons))
        soak.lost |= new_losses
    problems += leftovers(soak, first)
    outcome = Outcome(fault, started, before.name if before else None,
                      after.name if after else None, soak.flow_count, tuple(lost),
                      soak.idle_expected, held, in_sync, tuple(problems),
                      held_settled)
    counts = [count for count in (held, held_settled) if count is not None]
    if counts:
        soak.idle_expected = min(soak.idle_expected, *counts)
    return outcome


def run_schedule(soak, schedule, last_start, say):
    """Run the faults in order, each at its time or as soon as the one before has
    settled; none starts after `last_start` seconds. Returns (outcomes, faults
    not run)."""
    outcomes = []
    for index, fault in enumerate(schedule):
        now = time.monotonic() - soak.started
        if now > last_start:
            return outcomes, schedule[index:]
        time.sleep(max(0.0, fault.at - now))
        outcome = run_fault(soak, fault)
        outcomes.append(outcome)
        say(outcome)
    return outcomes, []


def run_soak(workdir, settings, progress=print, prefix=None):
    """Build the lab, run the seeded schedule, tear everything down; print the
    table as it goes and the last line. Returns (outcomes, faults not run)."""
    check_node_count(settings.nodes)
    schedule = draw_schedule(settings.seed, settings.minutes, settings.kinds,
                             settings.spacing, settings.copies)
    progress(f"seed {settings.seed}: {len(schedule)} faults in "
             f"{settings.minutes:g} minutes")
    with topology.running_lab(workdir, prefix=prefix, nodes=settings.nodes) as lab:
        soak = start_soak(lab, workdir, settings, progress)
        progress(format_row(ROW_HEADER))
        outcomes, skipped = run_schedule(
            soak, schedule,
            math.inf if settings.run_late_faults else settings.minutes * 60,
            lambda outcome: progress(format_row(row(outcome))))
    if skipped:
        progress(f"not run (out of time): {', '.join(f.kind for f in skipped)}")
    progress(summary_line(outcomes))
    return outcomes, skipped

