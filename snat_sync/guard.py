"""The reset-window guard: an nftables table in the router's namespace.

keepalived raises the router's addresses before it runs any notify script, and the
commit of a large replicated table takes hundreds of milliseconds. A packet of a
replicated flow that arrives in between meets no conntrack entry: a reply to the
gateway address is answered with a TCP RST, and a packet from the inside gets a
fresh SNAT mapping that the commit then cannot replace. While a node is not
primary, the guard drops (never rejects) every packet conntrack cannot place on the
router's interfaces; the notify hook lifts it as soon as the commit has finished,
so new connections wait no longer than the commit.

The rulesets are rendered files in the router's directory; loading one with
`nft -f` is a single atomic transaction that works whether the guard is up or not.
"""

import logging
import subprocess

from snat_sync import namespace as netns
from snat_sync.errors import SnatSyncError

LOG = logging.getLogger(__name__)

TABLE = "snat_sync_guard"
TIMEOUT = 10


class GuardError(SnatSyncError):
    pass


def nft_command(namespace, *arguments):
    """nft inside the router's namespace (nsenter is cheaper than ip netns exec)."""
    return ["nsenter", f"--net={netns.namespace_path(namespace)}", "nft", *arguments]


def raise_guard(namespace, files):
    _load(namespace, files.guard_raise)


def lift_guard(namespace, files):
    _load(namespace, files.guard_lift)


def is_up(namespace):
    result = subprocess.run(nft_command(namespace, "list", "table", "inet", TABLE),
                            capture_output=True, text=True, timeout=TIMEOUT)
    return result.returncode == 0


def _load(namespace, ruleset):
    try:
        result = subprocess.run(nft_command(namespace, "-f", str(ruleset)),
                                capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise GuardError(f"nft -f {ruleset} did not finish within {TIMEOUT} s") from None
    except OSError as error:
        raise GuardError(f"cannot run nft: {error}") from None
    if result.returncode != 0:
        raise GuardError(f"nft -f {ruleset} failed in namespace {namespace}: "
                         f"{result.stderr.strip()}")
