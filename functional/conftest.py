"""Fixtures for the functional tests: real namespaces, keepalived and conntrackd.

They need root and the binaries below; without them the whole directory is skipped
with the reason, unless SNAT_SYNC_REQUIRE_FUNCTIONAL=1 (set by .ci/run): then the
missing prerequisites are an error, and so is any functional test that skips, so
that CI cannot go green having run none of them.

Every test builds its own lab under a fresh namespace prefix and keeps its
snat-sync state under its own tmp_path, and the lab is torn down (processes killed
by pid, namespaces deleted) however the test ends.
"""

import os
import pathlib

import pytest

from snat_sync.lab import demo
from snat_sync.lab import topology as lab_module

FUNCTIONAL_DIRECTORY = pathlib.Path(__file__).resolve().parent
REQUIRE_FUNCTIONAL = "SNAT_SYNC_REQUIRE_FUNCTIONAL"


def functional_required():
    return os.environ.get(REQUIRE_FUNCTIONAL, "") not in ("", "0")


def is_functional(item):
    return FUNCTIONAL_DIRECTORY in pathlib.Path(item.path).resolve().parents


def pytest_collection_modifyitems(config, items):
    problems = demo.missing_prerequisites()
    if not problems:
        return
    reason = "functional tests skipped: " + "; ".join(problems)
    if functional_required() and any(map(is_functional, items)):
        raise pytest.UsageError(
            f"{REQUIRE_FUNCTIONAL} is set, but the functional tests cannot run: "
            + "; ".join(problems))
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if is_functional(item):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With SNAT_SYNC_REQUIRE_FUNCTIONAL, a functional test that skips (its own
    skipif, a pytest.skip) fails instead."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and functional_required() and is_functional(item) and not (
            hasattr(report, "wasxfail")):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skipped although {REQUIRE_FUNCTIONAL} is "
                           f"set: {report.longrepr}")


@pytest.fixture
def lab(tmp_path):
    """A freshly built lab without keepalived; torn down after the test."""
    with lab_module.running_lab(tmp_path / "lab") as built:
        yield built


@pytest.fixture
def state_paths(tmp_path):
    """One snat-sync state path per router node (short: socket paths are limited)."""
    return {name: tmp_path / name for name in ("r1", "r2")}


@pytest.fixture
def add_router(lab, state_paths):
    """`snat-sync router add` for a router of the lab, on that router's node."""

    def add(router):
        return lab_module.snat_sync_router_add(lab, router, state_paths[router.name])

    return add
