"""The daemon's role watchers: one watcher.RoleWatcher per router namespace, polled
in the daemon's selector. When a watcher starts, the router is taken into the role
its primary address shows; each address event after that submits the transition
it says (jobs.transition), in the order the events came.
"""

import logging
import selectors
import time

from snat_sync import jobs
from snat_sync import namespace
from snat_sync import watcher as watcher_module
from snat_sync.roles import Role

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


class RoleWatchers:
    def __init__(self, conf, selector, submit):
        """submit(router_id, outcome, function, *arguments) queues a router's job."""
        self.conf = conf
        self.selector = selector
        self.submit = submit

    def ensure(self, router_id, tracked, spec):
        """Watch the router's namespace as it is now, if need be."""
        if spec.primary_address is None:
            return
        inode = namespace.namespace_inode(spec.namespace)
        current = tracked.watcher
        if current is not None and current.namespace_inode == inode:
            return
        if current is not None:  # the namespace was deleted or re-created
            self.close(tracked)
        if inode is None:
            return
        try:
            watcher = watcher_module.RoleWatcher(spec, inode)
            holds = watcher.holds_primary_address()
        except Exception as error:  # pyroute2 raises a variety of errors
            LOG.error("router %s: cannot watch namespace %s: %s", router_id,
                      spec.namespace, error)
            return
        tracked.watcher = watcher
        self.selector.register(watcher.fileno(), selectors.EVENT_READ,
                               ("watch", router_id))
        # Where the address is now is the role to be in; without a notify hook
        # (Neutron) this is also what raises the guard on a new backup and asks
        # the primary for its table. A transition already done is skipped.
        self.submit(router_id, "transition", jobs.transition, self.conf, router_id,
                    Role.PRIMARY if holds else Role.BACKUP, time.time())

    def close(self, tracked):
        if tracked.watcher is not None:
            self.selector.unregister(tracked.watcher.fileno())
            tracked.watcher.close()
        tracked.watcher = None

    def on_event(self, router_id, tracked):
        """Submit the transitions the waiting address events say."""
        arrived = time.time()
        try:
            changes = tracked.watcher.read()
        except Exception as error:
            LOG.error("router %s: address watcher failed: %s", router_id, error)
            self.close(tracked)
            return
        for role in changes:
            LOG.info("router %s: primary address %s on %s", router_id,
                     "appeared" if role is Role.PRIMARY else "disappeared",
                     tracked.spec.ha_interface)
            self.submit(router_id, "transition", jobs.transition, self.conf,
                        router_id, role, arrived)
