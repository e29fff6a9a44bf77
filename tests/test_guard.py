"""The reset-window guard: the exact nft commands run in the router's namespace
(faked with pytest-subprocess; no namespace and no nft are touched)."""

import subprocess

import pytest

from snat_sync import guard
from snat_sync import nftables
from snat_sync.errors import SnatSyncError


def nft(namespace, *arguments):
    return ["nsenter", f"--net=/run/netns/{namespace}", "nft", *arguments]


def test_nft_command_enters_the_routers_namespace():
    assert nftables.nft_command("qrouter-r1", "-f", "x.nft") == nft("qrouter-r1", "-f",
                                                                 "x.nft")


def test_raise_loads_the_raise_ruleset_only(router_files, fp):
    fp.register(nft("qrouter-r1", "-f", str(router_files.guard_raise)))
    guard.raise_guard("qrouter-r1", router_files)
    assert list(fp.calls) == [nft("qrouter-r1", "-f", str(router_files.guard_raise))]


def test_lift_loads_the_lift_ruleset_only(router_files, fp):
    fp.register(nft("qrouter-r1", "-f", str(router_files.guard_lift)))
    guard.lift_guard("qrouter-r1", router_files)
    assert list(fp.calls) == [nft("qrouter-r1", "-f", str(router_files.guard_lift))]


@pytest.mark.parametrize("action, ruleset", [(guard.raise_guard, "guard_raise"),
                                             (guard.lift_guard, "guard_lift")])
def test_a_failing_nft_is_a_guard_error_naming_the_namespace(router_files, fp, action,
                                                             ruleset):
    path = str(getattr(router_files, ruleset))
    fp.register(nft("qrouter-r1", "-f", path), returncode=1,
                stderr="Error: Could not process rule: No such file or directory\n")
    with pytest.raises(guard.GuardError) as caught:
        action("qrouter-r1", router_files)
    message = str(caught.value)
    assert "qrouter-r1" in message
    assert path in message
    assert "Could not process rule" in message
    assert isinstance(caught.value, SnatSyncError)  # recorded as a failed step


def test_a_hanging_nft_is_a_guard_error(router_files, fp):
    def hang(process):
        raise subprocess.TimeoutExpired(process.args, nftables.TIMEOUT)

    fp.register(nft("qrouter-r1", "-f", str(router_files.guard_lift)), callback=hang)
    with pytest.raises(guard.GuardError, match=f"within {nftables.TIMEOUT} s"):
        guard.lift_guard("qrouter-r1", router_files)


def test_missing_nsenter_is_a_guard_error(router_files, fp):
    def missing(process):
        raise FileNotFoundError(2, "No such file or directory", "nsenter")

    fp.register(nft("qrouter-r1", "-f", str(router_files.guard_raise)),
                callback=missing)
    with pytest.raises(guard.GuardError, match="cannot run nft"):
        guard.raise_guard("qrouter-r1", router_files)


@pytest.mark.parametrize("returncode, up", [(0, True), (1, False)])
def test_is_up_lists_the_guard_table(fp, returncode, up):
    command = nft("qrouter-r1", "list", "table", "inet", guard.TABLE)
    fp.register(command, returncode=returncode)
    assert guard.is_up("qrouter-r1") is up
    assert list(fp.calls) == [command]
