"""A notify storm: 50 MASTER/BACKUP transitions fired at one router within seconds.

keepalived runs notify scripts fire-and-forget, so a flapping router runs many
hooks at once. The rendered hook is fired here the way keepalived fires it
(`notify.sh INSTANCE VR_1 MASTER|BACKUP 100`, inside the router's namespace), 50
times in a seeded random order, each without waiting for the one before, with r2's
replica holding 20,000 entries so that every commit takes real time and would
overlap another transition if they were not serialised. Afterwards the router must
be in the role of the hook fired last, no two transitions may have run their steps
at the same time, and nothing the storm started may be left running.

Cold standby (both storms): the MASTER hooks commit the external cache, and the
commits may not overlap; the guard is up exactly when r2 ends backup. Warm standby
(the storm ending BACKUP, where warm does its work: forget, flush the kernel
table, resync): the replica is r2's kernel table, nothing is committed, the
BACKUP hooks' forget-own-entries may not overlap, and no guard is ever raised.
About 20 s per storm.
"""

import json
import random
import shutil
import subprocess
import time

import psutil
import pytest

from snat_sync import guard
from snat_sync.lab import topology as lab_module

IDLE_ENTRIES = 20_000
HOOKS = 50
GAP_SECONDS = (0.02, 0.06)
HOOK_TIMEOUT = 120
ROLES = {"MASTER": "primary", "BACKUP": "backup"}


def timed_conntrackd(directory, standby_mode):
    """A stand-in for the conntrackd binary that appends "started finished status
    option" to commits.log for each commit (-c) and each flush (-f: a hook's
    forget-own-entries, or cold's flush-caches) it runs, whoever asked for it, and
    is conntrackd itself for everything else.

    The history records a hook's commit from before it waits for the transition
    lock, so only this shows when each commit really ran, the superseded
    transitions' commits included (their records have no steps).
    Returns (the config file that names it and standby_mode, the commit log).
    """
    directory.mkdir(mode=0o700, exist_ok=True)
    conntrackd = shutil.which("conntrackd")
    commits = directory / "commits.log"
    wrapper = directory / "conntrackd-timed"
    wrapper.write_text(
        "#!/bin/bash\n"
        'if [ "${3:-}" = -c ] || [ "${3:-}" = -f ]; then\n'
        "    started=$EPOCHREALTIME\n"
        f'    {conntrackd} "$@"\n'
        "    status=$?\n"
        f'    echo "$started $EPOCHREALTIME $status $3" >>{commits}\n'
        "    exit $status\n"
        "fi\n"
        f'exec {conntrackd} "$@"\n')
    wrapper.chmod(0o700)
    config = directory / "snat-sync.conf"
    config.write_text(f"[conntrackd]\nbinary = {wrapper}\n"
                      f"[failover]\nstandby_mode = {standby_mode}\n"
                      "[metrics]\nlisten_port = 0\n")
    config.chmod(0o600)
    return config, commits


def read_commits(path, option="-c"):
    """(started, finished, exit status) of every commit (or, with option "-f",
    every flush) timed_conntrackd ran."""
    commits = []
    for line in path.read_text().splitlines() if path.exists() else ():
        started, finished, status, ran = line.split()
        if ran == option:
            commits.append((float(started), float(finished), int(status)))
    return commits


def storm_states(seed, last):
    """HOOKS keepalived states in a seeded random order, ending with `last`."""
    chooser = random.Random(seed)
    return [chooser.choice(tuple(ROLES)) for _ in range(HOOKS - 1)] + [last]


def fire_hook(router, hook, state, priority=100):
    """Start the notify hook in router's namespace as keepalived would: TYPE NAME
    STATE PRIORITY appended, not waited for."""
    return subprocess.Popen(
        ["ip", "netns", "exec", router.namespace, str(hook),
         "INSTANCE", "VR_1", state, str(priority)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)


def has_taken_arrival_time(process):
    """Whether the hook has read its arrival time ($EPOCHREALTIME, its first step):
    past that line it runs flock (MASTER) or has exec'd snat-sync.

    Waiting for this before firing the next hook makes the arrival order the
    firing order even when a loaded machine is slow to start bash.
    """
    try:
        hook = psutil.Process(process.pid)
        return bool(hook.children()) or "snat_sync" in hook.cmdline()
    except psutil.Error:
        return True  # it has run through already


def storm(router, hook, states, seed):
    """Fire one hook per state, 20-60 ms apart; wait for all; return exit codes."""
    pauses = random.Random(seed + 1)
    processes = []
    try:
        for state in states:
            process = fire_hook(router, hook, state)
            processes.append(process)
            assert lab_module.wait_until(lambda: has_taken_arrival_time(process), 10,
                                         interval=0.002), f"hook {state} never started"
            time.sleep(pauses.uniform(*GAP_SECONDS))
        return [process.wait(timeout=HOOK_TIMEOUT) for process in processes]
    finally:
        for process in processes:
            lab_module.stop_process(process)


def read_history(state_path, router_id):
    path = state_path / "routers" / router_id / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def overlapping(spans):
    """Pairs of (label, start, end) spans that overlap in time."""
    ordered = sorted(spans, key=lambda span: span[1])
    return [(earlier, later) for earlier, later in zip(ordered, ordered[1:])
            if later[1] < earlier[2]]


def leftover_processes(router, state_path):
    """Processes in router's namespace, and anywhere whose command line names the
    router's state path (notify.sh, flock, snat-sync, conntrackd -c ...)."""
    found = {process.pid: process for process in
             lab_module.processes_in_namespace(router.namespace)}
    for process in psutil.process_iter():
        try:
            if any(str(state_path) in argument for argument in process.cmdline()):
                found[process.pid] = process
        except psutil.Error:
            continue
    described = []
    for process in found.values():
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                described.append((process.pid, " ".join(process.cmdline())))
        except psutil.Error:
            continue
    return described


@pytest.mark.parametrize("standby_mode, last, seed", [
    ("cold", "MASTER", 7), ("cold", "BACKUP", 11), ("warm", "BACKUP", 11)])
def test_notify_storm_ends_in_the_last_role(lab, state_paths, tmp_path,
                                            standby_mode, last, seed):
    r1, r2 = lab.routers
    config, commit_log = timed_conntrackd(tmp_path / "bin", standby_mode)
    registrations = {
        router.name: lab_module.snat_sync_router_add(
            lab, router, state_paths[router.name], "--config-file", config)
        for router in lab.routers
    }
    hooks = {name: registration.notify_command
             for name, registration in registrations.items()}
    for router, state in ((r1, "MASTER"), (r2, "BACKUP")):
        assert fire_hook(router, hooks[router.name], state).wait(timeout=60) == 0
    loaded = lab_module.load_idle_entries(r1, IDLE_ENTRIES, tmp_path)
    assert loaded >= IDLE_ENTRIES

    def replica():
        if standby_mode == "warm":  # r2's kernel table
            return lab_module.kernel_entry_count(r2)
        return lab_module.snat_sync_status(state_paths["r2"], lab.router_id)[0][
            "external_cache"]

    assert lab_module.wait_until(lambda: replica() >= IDLE_ENTRIES, 30,
                                 interval=0.5), replica()

    states = storm_states(seed, last)
    storm_started = time.time()
    exit_codes = storm(r2, hooks["r2"], states, seed)
    storm_seconds = time.time() - storm_started

    assert exit_codes == [0] * HOOKS, list(zip(states, exit_codes))
    conntrackds = lab_module.named_processes_in_namespace(r2.namespace, "conntrackd")
    assert len(conntrackds) == 1, conntrackds
    left = leftover_processes(r2, state_paths["r2"])
    assert [pid for pid, _ in left] == [conntrackds[0].pid], left

    transitions = [entry for entry in read_history(state_paths["r2"], lab.router_id)
                   if entry["kind"] == "transition"
                   and entry["arrived"] >= storm_started]
    assert len(transitions) == HOOKS, [entry["role"] for entry in transitions]
    by_arrival = sorted(transitions, key=lambda entry: entry["arrived"])
    assert [entry["role"] for entry in by_arrival] == [ROLES[s] for s in states], (
        "the hooks did not arrive in the order they were fired")

    commits = [commit for commit in read_commits(commit_log)
               if commit[0] >= storm_started]
    if standby_mode == "cold":
        # A MASTER hook that finds a newer transition has taken the lock commits
        # nothing.
        assert 1 <= len(commits) <= states.count("MASTER"), commits
        assert all(exit_status == 0 for _, _, exit_status in commits), commits
        assert not overlapping([("commit", started, finished)
                                for started, finished, _ in commits]), (
            "commits overlapped")
    else:
        assert commits == [], "a warm takeover committed"
        # The BACKUP hooks' first step, under the lock like a cold commit; one
        # that finds a newer transition has taken the lock forgets nothing.
        forgets = [flush for flush in read_commits(commit_log, "-f")
                   if flush[0] >= storm_started]
        assert 1 <= len(forgets) <= states.count("BACKUP"), forgets
        assert all(exit_status == 0 for _, _, exit_status in forgets), forgets
        assert not overlapping([("forget", started, finished)
                                for started, finished, _ in forgets]), (
            "forget-own-entries overlapped")
    ran = [entry for entry in transitions if entry["steps"]]
    assert not overlapping([(entry["role"], entry["started"], entry["finished"])
                            for entry in ran]), "transitions ran at the same time"
    outside = [(entry["role"], step["name"]) for entry in ran
               for step in entry["steps"] if step["run_by"] == "snat-sync"
               and not entry["started"] <= step["started"] <= entry["finished"]]
    assert not outside, f"steps run outside their transition: {outside}"

    expected_role = ROLES[last]
    recorded = json.loads((registrations["r2"].conntrackd_config.parent
                           / "last-transition.json").read_text())
    status = lab_module.snat_sync_status(state_paths["r2"], lab.router_id)[0]
    assert recorded["role"] == expected_role and recorded["outcome"] == "done", (
        f"the last hook fired was {last}, but r2 ended in: {recorded}")
    # The last hook runs its transition, or finds its role already reached.
    assert by_arrival[-1]["outcome"] in ("done", "already-done"), by_arrival[-1]
    assert status["last_transition"] == recorded
    assert status["role"] == expected_role, status
    guard_up = guard.is_up(r2.namespace)
    # warm standby has no commit to wait for, and no guard
    assert guard_up == (expected_role == "backup" and standby_mode == "cold"), (
        f"r2 ended {expected_role} in {standby_mode} standby with the "
        f"reset-window guard {'up' if guard_up else 'down'}")
    if standby_mode == "warm" and expected_role == "backup":
        # the last backup transition emptied r2's kernel table and asked for the
        # primary's: the replica is whole again
        assert lab_module.wait_until(
            lambda: lab_module.kernel_entry_count(r2) >= IDLE_ENTRIES, 15,
            interval=0.5), lab_module.kernel_entry_count(r2)
    outcomes = [entry["outcome"] for entry in transitions]
    timed = commits if standby_mode == "cold" else forgets
    print(f"[{standby_mode}] storm ending {last}: {storm_seconds:.1f} s, outcomes "
          f"{ {outcome: outcomes.count(outcome) for outcome in set(outcomes)} }, "
          f"{len(timed)} {'commits' if standby_mode == 'cold' else 'forgets'}, "
          f"longest {max(finished - started for started, finished, _ in timed):.2f} s")
