"""Reconciliation's decisions, pure: which routers this node should run, what to do
to each to get there, and what a freshly started conntrackd needs restored.

The daemon (daemon.py) gathers the inputs through inventory.py, asks these
functions, and hands the resulting actions to jobs.py on its pool.
"""

import dataclasses

from snat_sync import failover
from snat_sync.roles import Role
from snat_sync.router import RouterSpec


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing reconciliation decided to do to one router.

    add:    render, write and (re)start, through manager.add_router
    start:  its files are current but its conntrackd is not running: start it and
            restore its state
    remove: stop its conntrackd and delete its directory
    """

    kind: str
    router_id: str
    spec: RouterSpec | None = None


def desired_routers(configured, neutron_owned, neutron_specs):
    """The routers this node should run: {router_id: spec}.

    configured: specs under routers/; neutron_owned: those Neutron's files added;
    neutron_specs: Neutron's files, a spec or None where the file is unreadable
    (the router then stays as it is rather than being removed on a bad write).
    """
    desired = {router_id: spec for router_id, spec in configured.items()
               if router_id not in neutron_owned}
    for router_id, spec in neutron_specs.items():
        kept = spec if spec is not None else configured.get(router_id)
        if kept is not None:
            desired[router_id] = kept
    return desired


def reconcile_plan(desired, configured, running, rerender=False):
    """The actions that take configured and running to desired, in a stable order.

    rerender (on SIGHUP, the options may have changed) adds every desired router
    again: add_router rewrites only what changed and restarts conntrackd only if
    its configuration did.
    """
    actions = []
    for router_id, spec in sorted(desired.items()):
        if rerender or configured.get(router_id) != spec:
            actions.append(Action("add", router_id, spec))
        elif router_id not in running:
            actions.append(Action("start", router_id, spec))
    for router_id in sorted(configured.keys() - desired.keys()):
        actions.append(Action("remove", router_id))
    return tuple(actions)


def restore_steps(last_role, standby_mode=failover.WARM):
    """What a freshly (re)started conntrackd needs, given the router's last role.

    A new conntrackd has empty caches. On the primary it reads the kernel's table
    (-R) and sends all of it to the backups (-B), whose replica it refreshes; on a
    backup it asks the primary for its whole table (-n). A new conntrackd also
    reads its kernel table as its own: on a warm backup those are the replicated
    entries, which it must forget first (-f internal), or it would report their
    ends to the primary as its own. Otherwise there is nothing to restore: without
    a recorded role the next transition sets things up.
    """
    if last_role is Role.PRIMARY:
        return (failover.RESYNC_FROM_KERNEL, failover.BULK_SEND)
    if last_role is Role.BACKUP:
        if standby_mode == failover.WARM:
            return (failover.FORGET_OWN_ENTRIES, failover.REQUEST_RESYNC)
        return (failover.REQUEST_RESYNC,)
    return ()


def recorded_role(last_record):
    """The role of a last-transition record, or None."""
    try:
        return Role(last_record["role"])
    except (TypeError, KeyError, ValueError):
        return None
