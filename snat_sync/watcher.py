"""The daemon's own view of a router's VRRP role: its primary address, seen by netlink.

keepalived puts one address on the HA interface only while it is primary (Neutron:
169.254.0.<VRID>/24, the first address of its virtual_ipaddress block) and removes it
when it leaves that role. Neutron's keepalived configuration has no notify lines, so
watching that address is the only prompt trigger there; beside a notify hook it is a
second one, and both feed the same serialised transition (manager.notify).

One netlink socket per router namespace, subscribed to address events only: it costs
a few file descriptors and no CPU until an address changes. The daemon polls the
sockets in its own selector; `roles.role_change` decides, the watcher only reads.
"""

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

from snat_sync.roles import Role, address_event, role_change

RECEIVE_SIZE = 65536


class RoleWatcher:
    """Address events of one router namespace; fileno() goes into a selector."""

    def __init__(self, spec, namespace_inode):
        self.spec = spec
        self.namespace_inode = namespace_inode
        # flags=0: never create a namespace that is missing.
        self.ipr = IPRoute(netns=spec.namespace, flags=0)
        try:
            self.ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        except BaseException:
            self.ipr.close()
            raise

    def fileno(self):
        return self.ipr.asyncore.socket.fileno()

    def holds_primary_address(self):
        """Whether the primary address is on the HA interface right now."""
        for message in self.ipr.get_addr(family=_family(self.spec.primary_address)):
            event = address_event(message)  # a dump lists addresses as RTM_NEWADDR
            if event is not None and role_change(
                    event, self.spec.primary_address,
                    self.spec.ha_interface) is Role.PRIMARY:
                return True
        return False

    def read(self):
        """The role changes among the messages waiting on the socket, in order.

        Read straight off the socket until it is empty, and parsed by pyroute2:
        its own get() may leave messages in its queue, where the selector
        cannot see them.
        """
        messages = []
        while True:
            try:
                data = self.ipr.asyncore.socket.recv(RECEIVE_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped events: what counts is where the address is now.
                return [Role.PRIMARY if self.holds_primary_address() else Role.BACKUP]
            messages.extend(self.ipr.asyncore.marshal.parse(data))
        changes = []
        for message in messages:
            event = address_event(message)
            role = event and role_change(event, self.spec.primary_address,
                                         self.spec.ha_interface)
            if role is not None:
                changes.append(role)
        return changes

    def close(self):
        self.ipr.close()


def _family(interface):
    return socket.AF_INET if interface.version == 4 else socket.AF_INET6
