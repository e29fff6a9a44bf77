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


def restore_steps(role, standby_mode=failover.WARM):
    """What a freshly (re)started conntrackd needs, given the router's role.

    A new conntrackd has empty caches. On the primary it reads the kernel's table
    (-R, which a conntrackd just started has done) and sends all of it to the
    backups (-B), whose replica it refreshes; on a backup it asks the primary for
    its whole table (-n). With warm standby it must run the role's configuration
    (a backup's reads no conntrack events unless backup_reads_events; a node
    of unknown role runs a backup's), restarted if it was started with the other; and a new conntrackd
    reads its kernel table as its own: on a backup those are the replicated
    entries and on a node of unknown role perhaps a table from before a crash; it
    must forget them (-f internal), or it would report their ends, or send them,
    to the primary, which would delete or overwrite its live entries. With cold
    standby and no known role there is nothing to restore: the next transition
    sets things up.
    """
    warm = standby_mode == failover.WARM
    if role is Role.PRIMARY:
        return (*(failover.RUN_AS_PRIMARY,) * warm, failover.RESYNC_FROM_KERNEL,
                failover.BULK_SEND)
    if role is Role.BACKUP:
        return (*(failover.RUN_AS_BACKUP, failover.FORGET_OWN_ENTRIES) * warm,
                failover.REQUEST_RESYNC)
    return (failover.RUN_AS_BACKUP, failover.FORGET_OWN_ENTRIES) * warm


def restore_role(recorded, holds_primary_address, record_is_current):
    """The role to restore a restarted conntrackd as.

    holds_primary_address: whether the router's primary address is on its HA
    interface (None: the router has none, or it cannot be read), the live answer.
    Without it, the recorded role of the last transition, but as primary only when
    record_is_current (the daemon saw this conntrackd exit): when the daemon starts
    with conntrackd not running the node may be returning from a crash or a
    partition, its record from before that, and restoring it as primary would send
    its old table to the real primary.
    """
    if holds_primary_address is not None:
        return Role.PRIMARY if holds_primary_address else Role.BACKUP
    if recorded is Role.PRIMARY and not record_is_current:
        return None
    return recorded


def recorded_role(last_record):
    """The role of a last-transition record, or None."""
    try:
        return Role(last_record["role"])
    except (TypeError, KeyError, ValueError):
        return None
