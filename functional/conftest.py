"""Fixtures for the functional tests: real namespaces, keepalived and conntrackd.

They need root and the binaries below; without them the whole directory is skipped
with the reason, unless SNAT_SYNC_REQUIRE_FUNCTIONAL=1 (set by .ci/run): then the
missing prerequisites are an error, and so is any functional test that skips, so
that CI cannot go green having run none of them.

Every test builds its own lab under a fresh namespace prefix and keeps its
snat-sync state under its own tmp_path, and the lab is torn down (processes killed
by pid, namespaces deleted) however the test ends.

Labs do not see each other, so the tests run two at a time (pytest-xdist, `-n 2`),
except those marked `alone`: they time a failover against a bound a tenth of a
second wide, and another lab's load on two cores would decide the result. A shared
lock is held by every other functional test, an exclusive one by an `alone` test.
"""

import contextlib
import fcntl
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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone: runs while no other functional test does (a timing bound)")


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


@contextlib.contextmanager
def flocked(path, mode):
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, mode)
        yield


@contextlib.contextmanager
def alone_or_shared(item):
    """An `alone` test holds the run's lock exclusively, every other functional test
    shares it. A waiting `alone` test first takes the turnstile, which every test
    passes through before the lock, so the other worker cannot keep the lock shared
    from one test to the next while it waits. One process runs one test at a time:
    only xdist's workers (each with its own base directory under the run's) lock."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None or not is_functional(item):
        yield
        return
    run_directory = pathlib.Path(item.config.option.basetemp).parent
    turnstile, lock = run_directory / "turnstile.lock", run_directory / "alone.lock"
    if item.get_closest_marker("alone"):
        with flocked(turnstile, fcntl.LOCK_EX), flocked(lock, fcntl.LOCK_EX):
            yield
        return
    with flocked(turnstile, fcntl.LOCK_SH):
        pass
    with flocked(lock, fcntl.LOCK_SH):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The lock covers the whole item, setup and teardown too: a module's scenario
    (a module-scoped fixture) runs in its first test's setup."""
    with alone_or_shared(item):
        yield
