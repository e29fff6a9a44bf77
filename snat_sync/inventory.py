"""What the state path and the process table say about this node's routers: the
thin edge reconciliation reads (the decisions are in reconcile.py).

The desired routers come from two places under the state path:
    routers/<id>/spec.json   written by `snat-sync router add` (kept until removed)
    neutron/<id>.json        written by the Neutron L3 agent extension; the daemon
                             adds the router, marks its directory as Neutron's, and
                             removes the router once the file is gone
"""

import logging
import os

from snat_sync import manager
from snat_sync import statedir
from snat_sync.errors import InvalidInput
from snat_sync.router import check_router_id

# The daemon's rooms log as the daemon did before it was split into them.
LOG = logging.getLogger("snat_sync.daemon")

NEUTRON_DIRECTORY = "neutron"
# In a router's directory: the router was added from neutron/<id>.json.
NEUTRON_MARKER = "from-neutron"


def read_configured(state_path):
    """({router_id: spec} under routers/, {ids added from Neutron's files})."""
    directory = statedir.routers_directory(state_path)
    configured, neutron_owned = {}, set()
    if not directory.is_dir():
        return configured, neutron_owned
    for entry in sorted(os.listdir(directory)):
        try:
            spec = statedir.load_spec_file(directory / entry / "spec.json")
            if spec is None:
                continue
            configured[check_router_id(entry)] = spec
        except InvalidInput as error:
            LOG.error("router %s: ignoring its spec.json: %s", entry, error)
            continue
        if (directory / entry / NEUTRON_MARKER).exists():
            neutron_owned.add(entry)
    return configured, neutron_owned


def read_neutron_specs(state_path):
    """{router_id: spec or None} from neutron/<id>.json; None marks a bad file."""
    directory = statedir.check_state_path(state_path) / NEUTRON_DIRECTORY
    specs = {}
    if not directory.is_dir():
        return specs
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        router_id = entry[:-len(".json")]
        try:
            spec = statedir.load_spec_file(directory / entry)
            if spec is None:  # removed meanwhile
                continue
            if spec.router_id != check_router_id(router_id):
                raise InvalidInput("router", spec.router_id,
                                   f"does not match its file name {entry}")
        except InvalidInput as error:
            LOG.error("ignoring %s: %s", directory / entry, error)
            spec = None
        specs[router_id] = spec
    return specs


def running_daemons(conf, configured):
    """{router_id: pid} of the configured routers whose conntrackd runs."""
    return {router_id: process.pid for router_id, process
            in manager.running_conntrackd(conf, configured).items()}
