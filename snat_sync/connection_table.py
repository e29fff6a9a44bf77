"""The router namespace's kernel connection table: emptying it, the thin edge.

A node that becomes a warm backup empties its table before it asks the primary for
the whole of it, so that nothing it held before (a table kept through a crash or a
partition, its own flows as the former primary, with their TCP window data) can
stand in for the primary's version or outlive it.
"""


from snat_sync import namespace as netns
from snat_sync.errors import SnatSyncError

FAMILIES = ("ipv4", "ipv6")


class ConnectionTableError(SnatSyncError):
    pass


def flush_commands(namespace):
    """conntrack -F in the namespace, for each address family."""
    return [netns.command_inside(namespace, "conntrack", "-F", "-f", family)
            for family in FAMILIES]


def flush(namespace, timeout):
    for command in flush_commands(namespace):
        result = netns.run_inside(namespace, command[2:], timeout,
                                  ConnectionTableError)
        if result.returncode != 0:
            raise ConnectionTableError(
                f"{' '.join(command[2:])} failed in namespace {namespace}: "
                f"{result.stderr.strip()}")
