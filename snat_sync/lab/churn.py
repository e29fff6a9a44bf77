"""A churn of short new flows through the lab's SNAT router: UDP datagrams, each from
a fresh source port, at a steady rate.

    python3 -m snat_sync.lab.churn --server 203.0.113.100 --port 9001 \
        --rate 2000 --duration 600 [--output churn.json]

Every datagram comes from a new socket bound to port 0 on the next client address,
so each one is a new conntrack entry on the primary (UDP, unreplied, 30 s by
default): a table that keeps changing, as a busy router's does, while the soak
(lab/soak.py) breaks things. Nothing answers them; the server's namespace drops
them (the soak adds the rule), so no ICMP error comes back. The sending is paced
in ticks: each tick sends what the rate owes since the start, so a slow tick is
made up by the next ones rather than lowering the rate.
"""

import argparse
import json
import pathlib
import signal
import socket
import sys
import threading
import time

DEFAULT_ADDRESSES = tuple(f"192.168.100.{host}" for host in range(11, 19))
TICK = 0.01
# A tick never sends more than this many rate-seconds' worth (after a stall of the
# machine the generator does not burst to catch up all at once).
MAX_CATCH_UP = 0.2


def datagrams_due(rate, elapsed, sent):
    """How many datagrams the rate owes after `elapsed` seconds with `sent` sent,
    never more than MAX_CATCH_UP seconds' worth at once."""
    owed = int(rate * elapsed) - sent
    return max(0, min(owed, int(rate * MAX_CATCH_UP) or 1))


def send_one(address, server):
    """One datagram from a fresh ephemeral port of address; False if it failed (no
    route while the router fails over, a full buffer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
            sock.sendto(b"churn", server)
        except OSError:
            return False
    return True


def churn(server, addresses, rate, duration, stop):
    """Send at `rate` per second for `duration` seconds or until `stop` (an Event)
    is set; return the counts."""
    started = time.monotonic()
    sent = failed = 0
    while (elapsed := time.monotonic() - started) < duration and not stop.is_set():
        for _ in range(datagrams_due(rate, elapsed, sent + failed)):
            if send_one(addresses[(sent + failed) % len(addresses)], server):
                sent += 1
            else:
                failed += 1
        time.sleep(TICK)
    return {"sent": sent, "failed": failed,
            "seconds": round(time.monotonic() - started, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m snat_sync.lab.churn",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--addresses", default=",".join(DEFAULT_ADDRESSES))
    parser.add_argument("--rate", type=float, required=True, help="new flows a second")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--output", help="JSON counts file (default: stdout)")
    arguments = parser.parse_args(argv)
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda number, frame: stop.set())
    counts = churn((arguments.server, arguments.port), arguments.addresses.split(","),
                   arguments.rate, arguments.duration, stop)
    text = json.dumps(counts) + "\n"
    if arguments.output:
        pathlib.Path(arguments.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
