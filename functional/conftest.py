"""Fixtures for the functional tests: real namespaces, keepalived and conntrackd.

They need root and the binaries below; without them the whole directory is skipped
with the reason. Every test builds its own lab under a fresh namespace prefix and
keeps its snat-sync state under its own tmp_path, and the lab is torn down (processes
killed by pid, namespaces deleted) however the test ends.
"""

import pathlib

import pytest

from snat_sync.lab import demo
from snat_sync.lab import topology as lab_module

FUNCTIONAL_DIRECTORY = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    problems = demo.missing_prerequisites()
    if not problems:
        return
    skip = pytest.mark.skip(reason="functional tests skipped: " + "; ".join(problems))
    for item in items:
        if FUNCTIONAL_DIRECTORY in pathlib.Path(item.path).resolve().parents:
            item.add_marker(skip)


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
