"""The reset-window guard of cold standby: an nftables table in the router's namespace.

keepalived raises the router's addresses before it runs any notify script, and the
commit of a large replicated table takes hundreds of milliseconds. A packet of a
replicated flow that arrives in between meets no conntrack entry: a reply to the
gateway address is answered with a TCP RST, and a packet from the inside gets a
fresh SNAT mapping that the commit then cannot replace. While a node is not
primary, the guard drops (never rejects) every packet conntrack cannot place on the
router's interfaces; the notify hook lifts it as soon as the commit has finished,
so new connections wait no longer than the commit. Warm standby commits nothing
and needs no guard.

The rulesets are rendered files in the router's directory; loading one with
`nft -f` is a single atomic transaction that works whether the guard is up or not.
"""

from snat_sync import nftables

TABLE = "snat_sync_guard"
GuardError = nftables.NftablesError


def raise_guard(namespace, files):
    nftables.load_ruleset(namespace, files.guard_raise)


def lift_guard(namespace, files):
    nftables.load_ruleset(namespace, files.guard_lift)


def is_up(namespace):
    return nftables.run_nft(namespace, "list", "table", "inet", TABLE).returncode == 0
