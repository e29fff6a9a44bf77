"""The daemon's sockets in router namespaces as its selector holds them (the peer
channels' report sockets, the table listeners): each opened in a router's
namespace and registered under (kind, router id), or its failure logged; each
unregistered and closed together.
"""

import logging
import selectors

from snat_sync import namespace

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")


def open_registered(selector, kind, router_id, description, open_socket):
    """open_socket(), registered in selector for (kind, router_id); None if it
    cannot be opened, logged with description (what, where)."""
    try:
        opened = open_socket()
    except Exception as error:  # netlink, pyroute2 and bind raise a variety
        LOG.error("router %s: cannot open %s: %s", router_id, description, error)
        return None
    selector.register(opened.fileno(), selectors.EVENT_READ, (kind, router_id))
    return opened


def close_registered(selector, opened):
    """Unregister and close a socket open_registered gave (None: nothing)."""
    if opened is not None:
        selector.unregister(opened.fileno())
        opened.close()


def follow_namespace(selector, kind, router_id, namespace_name, held, description,
                     open_socket):
    """A socket that follows the router's namespace. held is (socket, inode of the
    namespace it was opened in), or (None, None): returned as it is while the
    namespace is still that one; otherwise the socket is closed and another
    opened in the namespace as it is now, and (None, None) returned if there is
    none or it cannot be opened (logged)."""
    inode = namespace.namespace_inode(namespace_name)
    opened, opened_in = held
    if opened is not None and opened_in == inode:
        return held
    close_registered(selector, opened)
    if inode is None:
        return None, None
    opened = open_registered(selector, kind, router_id, description, open_socket)
    return (opened, inode) if opened is not None else (None, None)
