"""The daemon's jobs that change one router, run on its thread pool (one job at a
time per router): add or start a router and restore its conntrackd's state, and
the address watcher's transitions. Each takes the router's transition lock, as
keepalived's notify hook does.
"""

import logging

from snat_sync import failover
from snat_sync import manager
from snat_sync import statedir
from snat_sync.roles import Role
from snat_sync.inventory import NEUTRON_MARKER
from snat_sync import namespace
from snat_sync.reconcile import recorded_role, restore_role, restore_steps

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


def add(conf, spec, snat_sync_command, from_neutron):
    """manager.add_router, then restore the state if conntrackd was (re)started.

    A conntrackd that ran until the add restarted it (its configuration changed,
    on SIGHUP say) leaves the router's last recorded transition current: the node
    did not go away, so a primary is restored as primary (resync from the kernel,
    bulk-send). Otherwise a restored primary could forget its table while it
    carries the traffic: the soak saw a SIGHUP on the primary, with
    nf_conntrack_max changed meanwhile, restart conntrackd with the new HashLimit
    and log "last recorded as primary, but that record is from before this daemon
    started: not restoring it as primary".

    Jobs that start conntrackd return a true value; the main loop then looks up the
    new processes of all such routers in one pass over the process table.
    """
    files = manager.router_files(conf, spec.router_id)
    was_running = manager.daemon_for(conf, spec, files).process() is not None
    result = manager.add_router(conf, spec, snat_sync_command)
    files = result.rendered.files
    if from_neutron:
        statedir.write_atomically(files.directory / NEUTRON_MARKER, "")
    if result.conntrackd_started:
        daemon = manager.daemon_for(conf, spec, files)
        with failover.transition_lock(files.transition_lock,
                                      conf.failover.lock_timeout):
            restore(conf, daemon, files, spec, record_is_current=was_running)
    return result.pid


def start(conf, spec, record_is_current=False):
    """Start a router's conntrackd that is not running, and restore its state.

    record_is_current: the daemon saw this conntrackd exit, so the router's last
    recorded transition describes the node as it is (see reconcile.restore_role).

    Under the router's transition lock, so no transition runs against a
    half-restored daemon and the role read here is the one the restore acts on.
    """
    files = manager.router_files(conf, spec.router_id)
    daemon = manager.daemon_for(conf, spec, files)
    with failover.transition_lock(files.transition_lock, conf.failover.lock_timeout):
        if statedir.read_json(files.spec) is None:
            LOG.info("router %s was removed meanwhile; not starting it",
                     spec.router_id)
            return False
        if daemon.start(conf.conntrackd.scheduler):
            LOG.warning("router %s: conntrackd was not running; started it",
                        spec.router_id)
            restore(conf, daemon, files, spec, record_is_current)
    return True


def restore(conf, daemon, files, spec, record_is_current=False):
    """Run restore_steps for the router's role; the caller holds the lock."""
    recorded = recorded_role(statedir.read_json(files.last_transition))
    holds = None
    if spec.primary_address is not None:
        holds = namespace.holds_address(spec.namespace, spec.ha_interface,
                                        spec.primary_address)
    role = restore_role(recorded, holds, record_is_current)
    if recorded is Role.PRIMARY and role is not Role.PRIMARY:
        LOG.warning("router %s: last recorded as primary, but %s: not restoring it "
                    "as primary", spec.router_id,
                    "its primary address is not here" if holds is False else
                    "that record is from before this daemon started")
    failover.run_steps(restore_steps(role, conf.failover.standby_mode), daemon, conf,
                       started_conntrackd=True)
    if role is not None:
        LOG.info("router %s: restored conntrackd state as %s", files.directory.name,
                 role.value)


def transition(conf, router_id, role, arrived):
    """The watcher's trigger: the same serialised transition keepalived's runs.

    Returns True, as the jobs that start conntrackd do: a transition restarts it
    with its role's configuration (run-as-primary, run-as-backup), and the main
    loop, which saw the old process exit while the job ran, must look up the new
    one, or it would neither supervise nor health-check the router any more.
    """
    record = manager.notify(conf, router_id, [role.value], arrived, skip_if_done=True)
    LOG.info("router %s: %s transition from the address watcher: %s", router_id,
             role.value, record.outcome)
    return True
