"""The daemon's sockets in router namespaces as its selector holds them (the peer
channels' report sockets, the table listeners): each opened in a router's
namespace and registered under (kind, router id), or its failure logged; each
unregistered and closed together.
"""

import logging
import selectors

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
