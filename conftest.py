"""pytest settings shared by tests/ and functional/.

A router's state directory holds conntrackd's control socket, and a UNIX socket path
stops at 108 bytes. pytest's own base directory (/tmp/pytest-of-root/pytest-N, plus
/popen-gwN per pytest-xdist worker) leaves too few of them for a state path under a
test's tmp_path, so a run given no --basetemp gets a short one of its own.
"""

import tempfile

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Runs before pytest's tmp_path plugin reads the base directory; xdist workers
    inherit the controller's."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="sst-")
