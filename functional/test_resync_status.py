"""Status is right while a returning backup resyncs, and `snat-sync wait` says when
it is done.

Two lab routers, a node daemon each (checks every second). The primary is loaded
with 100,000 idle entries at once and the backup's replica must follow (status
in-sync only once it holds them). Then the backup loses its replica, as a
restarted node does (flushed here: `conntrackd -f external` in cold standby,
`conntrack -F` in warm), and its daemon asks the primary for the whole table
after five short checks (repair_after = 5: a resync window of some seconds that
a test can see; a transition's own resync of 100,000 entries took 0.16 s).
While the replica is short the backup's verdict must be degraded, "resyncing";
it may be in-sync only once the replica holds the primary's table; `wait
--timeout 2` during the resync fails naming the router, and `wait --timeout 60`
returns within about a second of the replica becoming complete.

Written against status' replica_entries, primary_entries and standby_mode, so it
holds in either standby mode: warm (the replica is the backup's kernel table)
and cold (its external cache). The truth it measures the verdict against is read
independently, every 50 ms: the backup's replica where its mode keeps it, and
the primary's kernel table, both from /proc and conntrackd's control socket.
"""

import bisect
import json
import subprocess
import threading
import time

import pytest

from snat_sync import conntrackd as conntrackd_module
from snat_sync import health
from snat_sync import namespace
from snat_sync.lab import topology as lab_module

from functional.test_daemon import conntrackd_pid
from functional.test_self_healing import nodes_with_daemons, wait_until_settled

ENTRIES = 100_000


def write_config(path, standby_mode):
    path.write_text(
        "[health]\n"
        "check_interval = 1\n"
        "repair_after = 5\n"
        "[failover]\n"
        f"standby_mode = {standby_mode}\n"
        "[metrics]\n"
        "listen_port = 0\n")
    path.chmod(0o600)
    return path


def status(state_path, config, router_id):
    result = lab_module.snat_sync(state_path, "--config-file", config, "status",
                                  router_id, "--json")
    return json.loads(result.stdout)[0]


def wait_argv(state_path, config, router_id, timeout):
    return lab_module.snat_sync_argv(state_path, "--config-file", config, "wait",
                                     router_id, "--timeout", str(timeout))


class Truth:
    """The backup's replica and the primary's table, read every 50 ms."""

    def __init__(self, r1, r2, registration, standby_mode):
        self.r1_pid = conntrackd_pid(r1)
        self.r2_pid = conntrackd_pid(r2)
        self.socket = registration.conntrackd_config.parent / "conntrackd.ctl"
        self.standby_mode = standby_mode
        self.samples = []  # (monotonic time, replica, primary)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def replica(self):
        if self.standby_mode == "warm":
            return namespace.kernel_entry_count(self.r2_pid)
        text = conntrackd_module.query_stats(self.socket, "cache", 0.5)
        return conntrackd_module.parse_cache_stats(text).external_active \
            if text else None

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), self.replica(),
                                 namespace.kernel_entry_count(self.r1_pid)))
            time.sleep(0.05)

    def first_at_or_after(self, moment):
        """The index of the first sample taken at or after moment (samples are
        in time order)."""
        return bisect.bisect_left(self.samples, moment, key=lambda sample: sample[0])

    def samples_around(self, moment, each_side=3):
        """The samples either side of moment, times relative to it: what an
        assertion about that moment shows."""
        index = self.first_at_or_after(moment)
        return [(round(at - moment, 3), replica, primary) for at, replica, primary
                in self.samples[max(index - each_side, 0):index + each_side]]

    def complete_since(self):
        """When the replica last became complete (within the tolerance). A
        sample conntrackd did not answer (busy) tells nothing."""
        since = None
        for at, replica, primary in self.samples:
            if replica is None or primary is None:
                continue
            if health.is_short(replica, primary, 1.0):
                since = None
            elif since is None:
                since = at
        return since

    def was_short_after(self, moment):
        """Short at the first answered sample taken at or after moment. The
        replica only grows during a resync and the primary's idle table holds
        still, so a verdict read before moment that saw the replica complete
        must find it complete here too. (The last sample before moment may
        predate the status' own read by a sampling interval, in which a
        resync adds thousands of entries.)"""
        answered = (sample for sample in
                    self.samples[self.first_at_or_after(moment):]
                    if sample[1] is not None and sample[2] is not None)
        _at, replica, primary = next(answered, (None, None, None))
        if replica is None:
            return None
        return health.is_short(replica, primary, 1.0)


@pytest.mark.parametrize("standby_mode", ["warm", "cold"])
def test_a_returning_backup_is_resyncing_until_complete_and_wait_says_when(
        lab, state_paths, tmp_path, standby_mode):
    r1, r2 = lab.routers
    router_id = lab.router_id
    configs = {name: write_config(tmp_path / f"{name}.conf", standby_mode)
               for name in ("r1", "r2")}
    with nodes_with_daemons(lab, state_paths, tmp_path, configs) as registrations:
        lab_module.snat_sync(state_paths["r1"], "--config-file", configs["r1"],
                             "notify", router_id, "primary")
        lab_module.snat_sync(state_paths["r2"], "--config-file", configs["r2"],
                             "notify", router_id, "backup")
        wait_until_settled(state_paths, router_id)
        assert lab_module.load_idle_entries(r1, ENTRIES, tmp_path) == ENTRIES

        def backup_status():
            return status(state_paths["r2"], configs["r2"], router_id)

        assert lab_module.wait_until(
            lambda: (lambda found: found["verdict"] == "in-sync"
                     and (found["primary_entries"] or 0) >= ENTRIES)(backup_status()),
            60, interval=0.5), backup_status()
        first = backup_status()
        assert first["standby_mode"] == standby_mode
        assert first["replica_entries"] >= ENTRIES - 16

        truth = Truth(r1, r2, registrations["r2"], standby_mode)
        truth.thread.start()
        try:
            # The replica lost on the backup's side, where its mode keeps it.
            flush = (["conntrack", "-F"] if standby_mode == "warm" else
                     ["conntrackd", "-C", str(registrations["r2"].conntrackd_config),
                      "-f", "external"])
            lab_module.run(flush, namespace=r2.namespace)
            returned = time.monotonic()
            assert lab_module.wait_until(
                lambda: (truth.replica() or 0) < ENTRIES // 2, 5), truth.samples[-3:]
            print(f"\n[{standby_mode}] flushed: the replica short after "
                  f"{time.monotonic() - returned:.2f} s")
            waiting = subprocess.Popen(
                wait_argv(state_paths["r2"], configs["r2"], router_id, 60),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=lab_module.package_environment())
            short_wait = subprocess.Popen(
                wait_argv(state_paths["r2"], configs["r2"], router_id, 2),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=lab_module.package_environment())
            exited = {}  # when each wait exited, to the millisecond

            def stamp(name, process):
                process.wait()
                exited[name] = time.monotonic()

            watchers = [threading.Thread(target=stamp, args=each, daemon=True)
                        for each in (("long", waiting), ("short", short_wait))]
            for watcher in watchers:
                watcher.start()
            verdicts = []  # (time read, status) during the resync
            while time.monotonic() - returned < 60 and len(exited) < 2:
                found = backup_status()
                verdicts.append((time.monotonic(), found))
            for watcher in watchers:
                watcher.join(timeout=10)
            waited = exited["long"]
            output, _ = waiting.communicate(timeout=10)
            short_output, short_errors = short_wait.communicate(timeout=10)
            time.sleep(0.5)
        finally:
            truth.stop.set()
            truth.thread.join()

        complete = truth.complete_since()
        log = lab_module.read_tail(tmp_path / "daemon-r2.log", 4000)
        assert waiting.returncode == 0, (output, log)
        assert complete is not None, truth.samples[-5:]
        # short while the resync ran: the short wait failed, naming the router
        print(f"\n[{standby_mode}] resync complete {complete - returned:.2f} s after "
              f"the return; wait returned {waited - complete:.2f} s after that; "
              f"{len(verdicts)} status reads")
        assert short_wait.returncode == 1, (short_output, short_errors)
        assert router_id in short_output and "resyncing" in short_output
        assert waited - complete <= 2.0, (waited - complete, output)

        # never in-sync while the replica was short, by the independent truth
        for read_at, found in verdicts:
            if found["verdict"] == "in-sync":
                # the status call read the replica before it returned at
                # read_at: the truth right after must be complete
                assert truth.was_short_after(read_at) is False, (
                    {key: found[key] for key in ("replica_entries",
                                                 "primary_entries", "reason")},
                    read_at, truth.samples_around(read_at))
        resyncing = [found for _at, found in verdicts
                     if found["verdict"] == "degraded"
                     and "resyncing" in found["reason"]]
        degraded_for = max((at for at, found in verdicts
                            if found["verdict"] != "in-sync"), default=returned)
        print(f"[{standby_mode}] degraded for {degraded_for - returned:.2f} s; "
              f"reasons: {sorted({found['reason'][:40] for _at, found in verdicts})}")
        assert resyncing or complete - returned < 1.0, verdicts[:3]
        for found in resyncing:
            assert found["missing_entries"] == max(
                found["primary_entries"] - found["replica_entries"], 0)
        final = backup_status()
        assert final["verdict"] == "in-sync", final
        assert final["replica_entries"] >= final["primary_entries"] - 16
