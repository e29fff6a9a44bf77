"""A notify storm: 50 MASTER/BACKUP transitions fired at one router within seconds.

keepalived runs notify scripts fire-and-forget, so a flapping router runs many
hooks at once. The rendered hook is fired here the way keepalived fires it
(`notify.sh INSTANCE VR_1 MASTER|BACKUP 100`, inside the router's namespace), 50
times in a seeded random order, each without waiting for the one before, with r2's
replica holding 20,000 entries so that every commit takes real time and would
overlap another transition if they were not serialised. Afterwards the router must
be in the role of the hook fired last, no two transitions may have run their steps
at the same time, and nothing the storm started may be left running.
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


def timed_conntrackd(directory):
    """A stand-in for the conntrackd binary that appends "started finished status"
    to commits.log for each commit (-c) it runs, whoever asked for it, and is
    conntrackd itself for everything else.

    The history records a hook's commit from before it waits for the transition
    lock, so only this shows when each commit really ran, the superseded
    transitions' commits included (their records have no steps).
    Returns (the config file that names it, the commit log).
    """
    directory.mkdir(mode=0o700, exist_ok=True)
    conntrackd = shutil.which("conntrackd")
    commits = directory / "commits.log"
    wrapper = directory / "conntrackd-timed"
    wrapper.write_text(
        "#!/bin/bash\n"
        'if [ "${3:-}" = -c ]; then\n'
        "    started=$EPOCHREALTIME\n"
        f'    {conntrackd} "$@"\n'
        "    status=$?\n"
        f'    echo "$started $EPOCHREALTIME $status" >>{commits}\n'
        "    exit $status\n"
        "fi\n"
        f'exec {conntrackd} "$@"\n')
    wrapper.chmod(0o700)
    config = directory / "snat-sync.conf"
    config.write_text(f"[conntrackd]\nbinary = {wrapper}\n")
    config.chmod(0o600)
    return config, commits


def read_commits(path):
    """(started, finished, exit status) of every commit timed_conntrackd ran."""
    commits = []
    for line in path.read_text().splitlines():
        started, finished, status = line.split()
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


@pytest.mark.parametrize("last, seed", [("MASTER", 7), ("BACKUP", 11)])
def test_notify_storm_ends_in_the_last_role(lab, state_paths, tmp_path, last, seed):
    r1, r2 = lab.routers
    config, commit_log = timed_conntrackd(tmp_path / "bin")
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
    assert lab_module.wait_until(
        lambda: lab_module.snat_sync_status(state_paths["r2"], lab.router_id)[0][
            "external_cache"] >= IDLE_ENTRIES, 30, interval=0.5)

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
    # A MASTER hook that finds a newer transition has taken the lock commits nothing.
    assert 1 <= len(commits) <= states.count("MASTER"), commits
    assert all(exit_status == 0 for _, _, exit_status in commits), commits
    assert not overlapping([("commit", started, finished)
                            for started, finished, _ in commits]), "commits overlapped"
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
    assert guard_up == (expected_role == "backup"), (
        f"r2 ended {expected_role} with the reset-window guard "
        f"{'up' if guard_up else 'down'}")
    outcomes = [entry["outcome"] for entry in transitions]
    print(f"storm ending {last}: {storm_seconds:.1f} s, outcomes "
          f"{ {outcome: outcomes.count(outcome) for outcome in set(outcomes)} }, "
          f"{len(commits)} commits, longest "
          f"{max(finished - started for started, finished, _ in commits):.2f} s")
