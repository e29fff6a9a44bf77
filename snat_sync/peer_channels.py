"""The daemon's peer channels: one report socket per router, bound in the router's
namespace (reports.ReportChannel) and polled in the daemon's selector. The peers'
daemons send their health reports to it; the health check (health_check.py)
sends ours through it. A channel follows its namespace: when the namespace is
re-created the channel is opened anew in the new one. A router without peer
addresses reports by multicast (reports.Audience): its channel needs the HA
interface's index and network, read from the namespace when it is opened; it
is opened anew when that interface is re-created (its group membership went
with the old one).
"""

import logging
import time

from snat_sync import namespace
from snat_sync import namespace_sockets
from snat_sync import reports as reports_module

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


class PeerChannels:
    def __init__(self, conf, selector):
        self.conf = conf
        self.selector = selector

    def ensure(self, router_id, tracked, spec):
        """Open the router's channel in its namespace as it is now, if need be."""
        if tracked.channel is not None and _interface_replaced(tracked.channel, spec):
            self.close(tracked)
        port = reports_module.report_port(self.conf.health.base_port, spec.vrid)
        tracked.channel, tracked.channel_namespace = namespace_sockets.follow_namespace(
            self.selector, "report", router_id, spec.namespace,
            (tracked.channel, tracked.channel_namespace),
            f"the report socket on {spec.local_address} port {port} in namespace "
            f"{spec.namespace}", lambda: self._open(spec, port))

    def _open(self, spec, port):
        link = None if spec.peer_addresses else namespace.ha_link(spec)
        audience = reports_module.audience_for(
            spec, link.network if link else None, self.conf.conntrackd.multicast_group,
            self.conf.conntrackd.ipv6_multicast_group)
        return reports_module.ReportChannel(spec, port, audience,
                                            link.index if link else None)

    def close(self, tracked):
        namespace_sockets.close_registered(self.selector, tracked.channel)
        tracked.channel = tracked.channel_namespace = None

    def read(self, router_id, tracked):
        """Keep the reports waiting on the router's channel, the latest per peer."""
        try:
            received = tracked.channel.read(time.time())
        except OSError as error:
            LOG.error("router %s: reading peer reports failed: %s", router_id, error)
            self.close(tracked)
            return
        for report in received:
            tracked.peer_reports[report.address] = report
        if received:
            tracked.peer_reports = reports_module.current_reports(
                tracked.peer_reports, tracked.spec.peer_addresses, time.time(),
                self.conf.health.peer_timeout)


def _interface_replaced(channel, spec):
    """Whether a multicast channel's HA interface is gone or was re-created (a
    new index): its group membership went with the old one, so it would hear
    nothing more. A unicast channel is bound to the address and keeps working."""
    if not channel.audience.learned:
        return False
    try:
        return namespace.ha_link(spec).index != channel.ifindex
    except Exception:  # gone (InvalidInput) or netlink failed: reopen, which logs
        return True
