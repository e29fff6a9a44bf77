"""Warm standby's refreshes: the nftables table that keeps backups' entries alive.

With warm standby a backup's conntrackd puts every replicated entry into its kernel
table with the timeout the entry had when the primary last reported it. The
primary's conntrack reports an entry only when its state or status changes, so an
assured UDP stream or an established TCP connection is reported once and then no
more, while every packet renews its timer on the primary. The rendered ruleset
(templates/refresh.nft.j2) copies the number of the [failover] refresh_interval
tick (modulo 256, render.REFRESH_COUNTER_BITS) into the flow's connection mark, so
the first packet of each flow in a new tick changes it; conntrack reports the
change with the freshly renewed timeout, and conntrackd sends it on.
Like pfsync's updates, the cost follows the flows that carry traffic, not the size
of the table.

The table stays on every node of the router: a backup forwards nothing, so it
marks nothing until it becomes primary.
"""

from snat_sync import nftables

TABLE = "snat_sync_refresh"


def apply(namespace, files):
    """Load the router's rendered refresh ruleset (it adds or removes the table)."""
    nftables.load_ruleset(namespace, files.refresh_rules)


def remove(namespace):
    """Delete the table if it is there; never fails because it is not."""
    nftables.run_nft(namespace, "delete", "table", "inet", TABLE)


def is_loaded(namespace):
    return nftables.run_nft(namespace, "list", "table", "inet", TABLE).returncode == 0
