"""nftables in a router's namespace: load a rendered ruleset file, the thin edge.

Loading a file with `nft -f` is one atomic transaction. nft reads the times of day
in rules (`meta hour`) in its local time zone; it runs in UTC here, so a rendered
time is the kernel's, which counts in UTC.
"""

import subprocess

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
    try:
        return subprocess.run(nft_command(namespace, *arguments), capture_output=True,
                              text=True, timeout=TIMEOUT, env=ENVIRONMENT)
    except subprocess.TimeoutExpired:
        raise NftablesError(f"nft {' '.join(arguments)} did not finish within "
                            f"{TIMEOUT} s") from None
    except OSError as error:
        raise NftablesError(f"cannot run nft: {error}") from None


def load_ruleset(namespace, ruleset):
    result = run_nft(namespace, "-f", str(ruleset))
    if result.returncode != 0:
        raise NftablesError(f"nft -f {ruleset} failed in namespace {namespace}: "
                            f"{result.stderr.strip()}")
