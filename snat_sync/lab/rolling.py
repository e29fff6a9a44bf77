"""A rolling restart of a three-node router, one node after another (issue 12).

The lab's r1, r2 and r3 each run `snat-sync daemon` with its own state path and
config (health checks every second), keepalived (unicast to both others,
nopreempt, priorities ROLL_PRIORITIES) notifies it, r1 holds the idle entries and 16
TCP + 16 UDP flows run through it. The roll (`rolling_restart`): the primary
stops dead keeping its namespace and kernel table (nodes.die_keeping_table);
just before, while its processes are frozen, it gets an entry nobody replicates
(its stale entry) and the idle entries of one client get a mark no other node
hears of. The next node takes over; an entry new on it (a probe) is timed to
every other live node; the dead one returns (with its old table, or flushed: a
reboot) with the lowest priority, so that the next failover goes to a node not
restarted yet; `snat-sync wait` runs on all three nodes; a second probe; the
samples of every node's table are compared with the primary's; then the next
primary dies. r1, r2, r3 die in turn, and after r3's return the primary (r1
again) crashes for good, so that every return is followed by a failover:

    r1 dies -> r2 primary, r1 back;  r2 dies -> r3 primary, r2 back;
    r3 dies -> r1 primary, r3 back;  r1 crashes -> r2 primary

functional/test_three_nodes.py asserts on what `Observed` holds;
bench/rolling_restart.py runs it at 200,000 idle entries.
"""

import concurrent.futures
import contextlib
import dataclasses
import pathlib
import subprocess
import time

from snat_sync.lab import demo
from snat_sync.lab import nodes
from snat_sync.lab import topology as lab_module

FLOWS = 16
SAMPLE_CLIENT = "10.200.0.5"  # its idle entries get a mark on the dying node alone
DYING_MARK = 42
# (victim, who takes over, the victim's priority when it returns); the last
# failover's victim does not return.
ROLL = (("r1", "r2", 100), ("r2", "r3", 50), ("r3", "r1", 1), ("r1", "r2", None))
# One return and the failover after it: r3 (150) takes over from r2, not r1 (100).
SHORT_ROLL = (("r1", "r2", 100), ("r2", "r3", None))
# keepalived's priorities at the start. Of the backups that stop hearing the
# primary, the one of higher priority takes over first: after three adverts and
# a skew of (256 - priority) / 256 s. 50 apart is 0.2 s, a race a loaded machine
# does not lose; at 10 against 5 (0.02 s) the lower one won once in CI's time.
ROLL_PRIORITIES = {"r1": 250, "r2": 200, "r3": 150}
RETURN_AFTER = 1.0  # seconds after the VIP moved
# The next failure comes no sooner than this after the last one: a TCP flow's
# retransmission after a 3-4 s failover goes out 6.2 s after the loss began
# (0.2 + 0.4 + 0.8 + 1.6 + 3.2 s), and it must have answered before the next.
FAILURE_SPACING = 8.5
RUN_AFTER_LAST_FAILOVER = 9.0
WAIT_TIMEOUT = 20
PROBE_TIMEOUT = 2.0
CLIENT_DURATION = 300  # an upper bound: the client is stopped when the roll is done


def stale_entry(index):
    """The entry only the index-th victim ever has (inserted while it is frozen)."""
    return lab_module.SnatEntry("tcp", f"10.99.0.{index + 1}", 1234, 50123 + index,
                                server_address=f"198.18.0.{index + 1}")


@dataclasses.dataclass
class Failover:
    """One failover of the roll and what was seen after it and after the
    victim's return (the last victim does not return: those fields stay empty)."""

    victim: str
    successor: str
    failed_at: float  # wall clock, as the client's started_at
    took_over_after: float  # seconds until the successor held the VIPs
    wait_seconds: float | None = None  # until `snat-sync wait` said in-sync on all
    wait_status: tuple = ()  # exit status of `wait` on each node
    # node: seconds until the probe reached it (None: never), after the
    # failover and after the return
    probe_after_failover: dict = dataclasses.field(default_factory=dict)
    probe_after_return: dict = dataclasses.field(default_factory=dict)
    differences: dict = dataclasses.field(default_factory=dict)  # node: sample diff
    stale_left: dict = dataclasses.field(default_factory=dict)  # node: stale entries
    marked_left: dict = dataclasses.field(default_factory=dict)  # node: marked
    idle_held: dict = dataclasses.field(default_factory=dict)  # node: idle entries

    @property
    def tables_agree(self):
        """After the return every node's samples were the primary's: no entry
        more or less, no stale entry, no dying node's mark."""
        return (all(difference == (0, 0) for difference in self.differences.values())
                and not any(self.stale_left.values())
                and not any(self.marked_left.values()))


@dataclasses.dataclass
class Observed:
    """The flows' results (flows.FlowResult, times since the client started at
    started_at, wall clock), the failovers in order and the run's length."""

    results: list
    started_at: float
    failovers: list
    seconds: float

    def failure_moments(self):
        return [failover.failed_at - self.started_at for failover in self.failovers]

    def lost_after(self, index):
        """Flows that did not answer again between failover `index` and the next
        failure (for the last failover: the end of the run), or that changed
        their public endpoint."""
        moments = self.failure_moments()
        lost = []
        for result in self.results:
            if not result.same_public_endpoint:
                lost.append(result.flow_id)
            elif index + 1 < len(moments):
                if not result.was_alive_at(moments[index + 1]):
                    lost.append(result.flow_id)
            elif not result.alive:
                lost.append(result.flow_id)
        return lost

    def alive_counts(self):
        """Per failover: (TCP, UDP) flows alive on their public port after it."""
        counts = []
        for index in range(len(self.failovers)):
            lost = set(self.lost_after(index))
            counts.append(tuple(
                sum(1 for result in self.results
                    if result.protocol == protocol and result.flow_id not in lost)
                for protocol in ("tcp", "udp")))
        return counts


def holds(router, entry):
    """Whether router's kernel table has entry (an exact `conntrack -G`)."""
    return lab_module.run(
        ["conntrack", "-G", "-p", entry.protocol, "-s", entry.client_address,
         "-d", entry.server_address, "--sport", str(entry.client_port),
         "--dport", str(entry.server_port)], namespace=router.namespace,
        check=False).returncode == 0


def marked(router):
    result = lab_module.run(["conntrack", "-L", "-s", SAMPLE_CLIENT,
                             "-m", str(DYING_MARK)],
                            namespace=router.namespace, check=False)
    return sum(1 for line in result.stdout.splitlines() if line[:1].isalpha())


def sample_keys(router):
    """The entry keys of the samples: the flows, the marked client, the STALE
    entries (their own network)."""
    keys = set()
    for filters in (("-d", lab_module.SERVER_ADDRESS), ("-s", SAMPLE_CLIENT),
                    ("-s", "10.99.0.0/24")):
        keys |= nodes.table_keys(router, *filters)
    return keys


def node_config(workdir, name, repair, sync_mode="auto", extra=""):
    health = "[health]\ncheck_interval = 1\n" + ("" if repair else "repair = false\n")
    return nodes.write_config(
        workdir / f"{name}.conf", resync_on_backup=repair,
        extra=health + f"[conntrackd]\nsync_mode = {sync_mode}\n" + extra)


PROBES = iter(range(1, 250))


def probe(lab, primary, timeout=PROBE_TIMEOUT):
    """Insert a new entry on the primary; {node: seconds until it held it, or
    None} for every other live node."""
    number = next(PROBES)
    entry = lab_module.SnatEntry("udp", f"10.98.0.{number}", 2000, 51000 + number,
                                 server_address="198.18.1.1")
    lab_module.insert_entry(primary, entry)
    began = time.monotonic()
    others = [router for router in lab.routers
              if router is not primary and not router.crashed]
    reached = {router.name: None for router in others}
    while True:
        for router in others:
            if reached[router.name] is None and holds(router, entry):
                reached[router.name] = round(time.monotonic() - began, 2)
        if None not in reached.values() or time.monotonic() - began > timeout:
            return reached
        time.sleep(0.05)


def wait_in_sync(lab, started, timeout):
    """`snat-sync wait` on every node at once; (seconds until all returned, their
    exit statuses)."""
    began = time.monotonic()

    def wait(node):
        argv = lab_module.snat_sync_argv(node.state_path, *node.global_arguments,
                                         "wait", lab.router_id, "--timeout", timeout)
        return subprocess.run(argv, capture_output=True, text=True,
                              timeout=timeout + 30).returncode

    with concurrent.futures.ThreadPoolExecutor(len(started)) as pool:
        statuses = tuple(pool.map(wait, started.values()))
    return round(time.monotonic() - began, 2), statuses


def started_nodes(stack, workdir, repair, idle_entries, sync_mode="auto", extra=""):
    """A three-node lab with every daemon and keepalived running, the idle
    entries on r1 and replicated to r2 and r3. Returns (lab, {name: Router},
    {name: Node})."""
    workdir = pathlib.Path(workdir)
    lab = stack.enter_context(lab_module.running_lab(workdir / "lab", nodes=3))
    routers = {router.name: router for router in lab.routers}
    for name, router in routers.items():
        router.priority = ROLL_PRIORITIES[name]
    configs = {name: node_config(workdir, name, repair, sync_mode, extra)
               for name in routers}
    started = nodes.start_nodes(lab, workdir, configs)
    loaded = lab_module.load_idle_entries(routers["r1"], idle_entries, workdir)
    if loaded != idle_entries:
        raise lab_module.LabError(f"r1 took {loaded} of {idle_entries} idle entries")
    for name in ("r2", "r3"):
        if not lab_module.wait_until(
                lambda: lab_module.kernel_entry_count(routers[name]) >= idle_entries,
                30 + idle_entries / 10_000, 0.2):
            raise lab_module.LabError(f"{name} never held the idle entries")
    return lab, routers, started


def rolling_restart(workdir, repair=True, flush=False, idle_entries=5_000,
                    wait_timeout=WAIT_TIMEOUT, roll=ROLL):
    """Run the roll (module docstring) in a fresh lab under workdir; the
    Observed. repair False: resync_on_backup and [health] repair off. flush:
    each node returns with an empty table (True), its old one (False), or, one
    per step of the roll, each as the tuple says. roll: (victim, successor, priority
    it returns with or None for the last victim, which does not return), ROLL
    unless a shorter one is given (SHORT_ROLL)."""
    workdir = pathlib.Path(workdir)
    flushed = flush if isinstance(flush, tuple) else (flush,) * len(roll)
    began = time.monotonic()
    failovers = []
    with contextlib.ExitStack() as stack:
        lab, routers, started = started_nodes(stack, workdir, repair, idle_entries)
        server = demo.start_server(lab, workdir, CLIENT_DURATION + 10)
        client = demo.start_client(lab, workdir, demo.ScenarioSettings(
            flows=FLOWS, crash_after=0, run_after_crash=CLIENT_DURATION))
        time.sleep(4)
        for index, (victim, successor, priority) in enumerate(roll):
            if failovers:
                time.sleep(max(0.0, FAILURE_SPACING
                               - (time.time() - failovers[-1].failed_at)))
            dying = routers[victim]
            if lab_module.primary(lab) is not dying:
                raise lab_module.LabError(f"{victim} should be primary: {failovers}")

            def while_frozen():
                lab_module.insert_entry(dying, stale_entry(index))
                lab_module.run(["conntrack", "-U", "-p", "tcp", "-s", SAMPLE_CLIENT,
                                "-m", str(DYING_MARK)],
                               namespace=dying.namespace, check=False)

            failed_at = time.time()
            if priority is None:
                nodes.crash_node(lab, started[victim])
            else:
                nodes.die_keeping_table(lab, started[victim], while_frozen)
            lab_module.wait_for_primary(lab, routers[successor])
            failover = Failover(victim, successor, failed_at,
                                round(time.time() - failed_at, 2))
            failovers.append(failover)
            failover.probe_after_failover = probe(lab, routers[successor])
            if priority is None:
                break
            time.sleep(RETURN_AFTER)
            nodes.return_node(lab, started[victim], flush=flushed[index],
                              priority=priority)
            failover.wait_seconds, failover.wait_status = wait_in_sync(
                lab, started, wait_timeout)
            failover.probe_after_return = probe(lab, routers[successor])
            primary_keys = sample_keys(routers[successor])
            for name, router in routers.items():
                failover.stale_left[name] = [
                    number for number in range(index + 1)
                    if holds(router, stale_entry(number))]
                failover.marked_left[name] = marked(router)
                failover.idle_held[name] = lab_module.idle_entry_count(router)
                if router is not routers[successor]:
                    keys = sample_keys(router)
                    failover.differences[name] = (len(keys - primary_keys),
                                                  len(primary_keys - keys))
        time.sleep(RUN_AFTER_LAST_FAILOVER)
        results, started_at = demo.stop_flows(workdir, client, server)
    return Observed(results, started_at, failovers,
                    round(time.monotonic() - began, 1))


def describe(observed):
    """The roll as lines of text, one per failover."""
    lines = [f"run {observed.seconds} s; alive (TCP, UDP) after each failover "
             f"{observed.alive_counts()}"]
    for index, failover in enumerate(observed.failovers):
        lines.append(
            f"{failover.victim} -> {failover.successor} in "
            f"{failover.took_over_after} s; probe {failover.probe_after_failover}; "
            f"wait {failover.wait_seconds} s; probe {failover.probe_after_return} "
            f"{failover.wait_status}; differences {failover.differences}; stale "
            f"{failover.stale_left}; marked {failover.marked_left}; idle entries "
            f"{failover.idle_held}; lost "
            f"{observed.lost_after(index)}")
    return "\n".join(lines)
