"""`snat-sync status --json` of one node, run again and again in one process.

    python3 -m snat_sync.lab.status_poll --output FILE [--interval 0.5] -- ARGS...

ARGS are the command line of `snat-sync` without the program (global arguments,
`status`, the router, `--json`). Each run is the command's own (cli.main), in
this process: the soak reads every node's verdict about twice a second for
minutes, and a Python start-up per reading (0.3 s of CPU) cost more than the
reading. After each run FILE is replaced, atomically, with

    {"taken": <epoch when the run began>, "exit": <its exit status>,
     "status": <the command's JSON output, or null>, "stderr": "<its tail>"}

It runs until it is stopped (SIGTERM, by pid).
"""

import argparse
import contextlib
import io
import json
import logging
import os
import pathlib
import sys
import time

from snat_sync import cli


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python3 -m snat_sync.lab.status_poll")
    parser.add_argument("--output", type=pathlib.Path, required=True)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    arguments = parser.parse_args(argv)
    if arguments.command[:1] == ["--"]:
        arguments.command = arguments.command[1:]
    return arguments


def run_once(command):
    """One `snat-sync COMMAND` run: (exit status, its stdout, its stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(command))
    return code, out.getvalue(), err.getvalue()


def reading(taken, code, stdout, stderr):
    """The line written after one run."""
    try:
        status = json.loads(stdout)
    except ValueError:
        status = None
    return {"taken": taken, "exit": code, "status": status, "stderr": stderr[-300:]}


def write_atomically(path, data):
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def main(argv=None):
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    # cli.main's own logging.basicConfig would bind its handler to the first
    # run's captured stderr: the log goes to this process's stderr instead.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    while True:
        taken = time.time()
        write_atomically(arguments.output,
                         reading(taken, *run_once(arguments.command)))
        time.sleep(max(0.0, taken + arguments.interval - time.time()))


if __name__ == "__main__":
    sys.exit(main())
