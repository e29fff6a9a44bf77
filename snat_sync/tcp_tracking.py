"""TCP window tracking in a router's namespace: liberal, so that a node's own entries
keep their NAT when the flows come back to it after running through another node.

conntrack checks every TCP segment against the sequence and acknowledgment numbers
it has seen the connection use. After a partition of the HA link, the node that
stayed primary gets the flows back (its gratuitous ARPs once it hears the loser's
advert) with entries last updated before the split, while the loser carried the
flows for a few seconds. Every segment then acknowledges data this conntrack never
saw, so it is INVALID and NAT skips it: the client's segments leave with their
private source address, and a server's retransmission arrives for the gateway
address itself, whose TCP stack answers with an RST that resets the server's end
(seen in the partition-heal test: 1 or 2 of 16 TCP flows reset, or all of them
stalled until they gave up). An entry that conntrackd inserted, a backup's
replica, starts tracking afresh at its first segment; a node's own entries do not.
Liberal tracking (nf_conntrack_tcp_be_liberal) keeps the state machine and marks
only out-of-window RSTs invalid.

`settings` is pure; `apply` writes them with sysctl inside the namespace (the
setting is per network namespace).
"""


from snat_sync import namespace as netns
from snat_sync.errors import SnatSyncError

BE_LIBERAL = "net.netfilter.nf_conntrack_tcp_be_liberal"
TIMEOUT = 10
ENVIRONMENT = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


class TcpTrackingError(SnatSyncError):
    pass


def settings(failover_options):
    """The sysctls a router's namespace gets ({name: value}); none when
    [failover] liberal_tcp_tracking is off (the kernel's own setting stays)."""
    if not failover_options.liberal_tcp_tracking:
        return {}
    return {BE_LIBERAL: "1"}


def apply(namespace, sysctls):
    """Write sysctls ({name: value}) in the router's namespace."""
    if not sysctls:
        return
    command = ("sysctl", "-q", "-w",
               *(f"{name}={value}" for name, value in sysctls.items()))
    result = netns.run_inside(namespace, command, TIMEOUT, TcpTrackingError,
                              ENVIRONMENT)
    if result.returncode != 0:
        raise TcpTrackingError(f"sysctl failed in namespace {namespace}: "
                               f"{(result.stderr or result.stdout).strip()}")
