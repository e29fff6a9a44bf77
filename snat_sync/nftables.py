"""nftables in a router's namespace: load a rendered ruleset file, the thin edge.

Loading a file with `nft -f` is one atomic transaction. nft reads the times of day
in rules (`meta hour`) in its local time zone; it runs in UTC here, so a rendered
time is the kernel's, which counts in UTC.
"""


from snat_sync import namespace as netns
from snat_sync.errors import SnatSyncError

TIMEOUT = 10
ENVIRONMENT = {"TZ": "UTC", "LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


class NftablesError(SnatSyncError):
    pass


def nft_command(namespace, *arguments):
    """nft inside the router's namespace."""
    return netns.command_inside(namespace, "nft", *arguments)


def run_nft(namespace, *arguments):
    """Run nft in the namespace; the CompletedProcess (check returncode yourself)."""
    return netns.run_inside(namespace, ("nft", *arguments), TIMEOUT, NftablesError,
                            ENVIRONMENT)


def load_ruleset(namespace, ruleset):
    result = run_nft(namespace, "-f", str(ruleset))
    if result.returncode != 0:
        raise NftablesError(f"nft -f {ruleset} failed in namespace {namespace}: "
                            f"{result.stderr.strip()}")
