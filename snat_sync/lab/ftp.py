"""A minimal FTP server and a scripted FTP client for the lab's helper tests.

    python3 -m snat_sync.lab.ftp server --address 203.0.113.100 --duration 60
    python3 -m snat_sync.lab.ftp client --server 203.0.113.100 \
        --addresses 192.168.100.11,... --ready-file R --go-file G --output OUT

The router gives the control connections (port 21) the kernel's ftp helper, which
watches PASV replies and PORT commands, expects the data connection they announce
and, with SNAT, rewrites the client's address in PORT to the gateway's. The client
runs four sessions, each from its own address, in two phases around a failover:

- running-passive, running-active: a paced download (`RETR paced-BLOCKS-MS`) that
  starts before the failover and is still running when it happens; it must arrive
  whole.
- pending-passive: PASV is sent before the failover, so the primary holds the
  expectation; the data connection opens after it (on the new primary), and a
  second download then announces a fresh data connection to the new primary's
  helper.
- pending-active: the same with PORT: the server opens the data connection
  announced before the failover after it, through the new primary. The helper's
  rewrite of PORT (the client's address to the gateway's) changes the length of
  the control connection's segments, so the primary shifts its sequence numbers
  from then on, and the new primary must shift them the same way.

Phase one ends by writing --ready-file; phase two starts once --go-file exists.
The server is just enough FTP for Python's ftplib: USER, PASS, TYPE, PASV, PORT,
RETR, QUIT. Both programs stop by themselves.
"""

import argparse
import contextlib
import dataclasses
import ftplib
import json
import pathlib
import socket
import socketserver
import sys
import threading
import time

CONTROL_PORT = 21
BLOCK_SIZE = 4096
SMALL_FILE = "paced-4-0"
# The running downloads: 1 MB in 4 KB blocks, one every 25 ms: 6.4 s of transfer.
RUNNING_FILE = "paced-256-25"
SESSIONS = ("running-passive", "running-active", "pending-passive", "pending-active")
# The sessions whose data connection is announced before the failover, and
# whether in passive mode.
PENDING_SESSIONS = (("pending-passive", True), ("pending-active", False))
# A surviving connection resumes at TCP's retransmission 3.0 or 6.2 s after the
# crash; one that waits longer than this is dead.
DATA_TIMEOUT = 10.0
# Phase two starts once the new primary holds the addresses: a connection that
# works answers at once there.
PHASE_TWO_TIMEOUT = 5.0


def block(index):
    """The index-th block of every file: its content says where it belongs."""
    return bytes([index % 251]) * BLOCK_SIZE


def parse_file_name(name):
    """(blocks, milliseconds between blocks) of a `paced-BLOCKS-MS` file name."""
    kind, blocks, interval = name.split("-")
    if kind != "paced":
        raise ValueError(f"no such file {name!r}")
    return int(blocks), int(interval)


def expected_content(name):
    blocks, _ = parse_file_name(name)
    return b"".join(block(index) for index in range(blocks))


def format_host_port(address, port):
    """`h1,h2,h3,h4,p1,p2` as PASV replies and PORT commands carry them."""
    return ",".join([*address.split("."), str(port >> 8), str(port & 0xFF)])


def parse_host_port(text):
    numbers = [int(part) for part in text.strip("() .\r\n").split(",")]
    if len(numbers) != 6:
        raise ValueError(f"not h1,h2,h3,h4,p1,p2: {text!r}")
    return ".".join(map(str, numbers[:4])), numbers[4] << 8 | numbers[5]


# --- server ---------------------------------------------------------------------------


class ControlHandler(socketserver.StreamRequestHandler):
    """One FTP control connection, one command per line."""

    def setup(self):
        super().setup()
        self.passive = None
        self.active_target = None

    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        self.reply("220 snat-sync lab FTP")
        for raw in self.rfile:
            command, _, argument = raw.decode(errors="replace").strip().partition(" ")
            command = command.upper()
            if command == "QUIT":
                self.reply("221 bye")
                return
            handler = getattr(self, f"do_{command}", None)
            if handler is None:
                self.reply(f"502 {command} not implemented")
            else:
                handler(argument)

    def do_USER(self, _argument):
        self.reply("331 any password")

    def do_PASS(self, _argument):
        self.reply("230 logged in")

    def do_TYPE(self, _argument):
        self.reply("200 binary")

    def do_PASV(self, _argument):
        self.close_passive()
        self.passive = socket.create_server((self.server.address, 0))
        self.passive.settimeout(DATA_TIMEOUT)
        port = self.passive.getsockname()[1]
        self.reply(f"227 Entering Passive Mode "
                   f"({format_host_port(self.server.address, port)}).")

    def do_PORT(self, argument):
        self.close_passive()
        try:
            self.active_target = parse_host_port(argument)
        except ValueError:
            self.reply("501 bad PORT")
            return
        self.reply("200 PORT ok")

    def do_RETR(self, name):
        try:
            blocks, interval = parse_file_name(name)
        except ValueError:
            self.reply(f"550 no such file {name}")
            return
        self.reply("150 opening data connection")
        try:
            data = self.open_data()
        except OSError as error:
            self.reply(f"425 no data connection: {error}")
            return
        with data:
            for index in range(blocks):
                data.sendall(block(index))
                if interval:
                    time.sleep(interval / 1000)
        self.reply("226 transfer complete")

    def open_data(self):
        if self.passive is not None:
            passive, self.passive = self.passive, None
            with passive:
                connection, _ = passive.accept()
            return connection
        if self.active_target is None:
            raise OSError("neither PASV nor PORT")
        target, self.active_target = self.active_target, None
        return socket.create_connection(target, timeout=DATA_TIMEOUT,
                                        source_address=(self.server.address, 0))

    def close_passive(self):
        if self.passive is not None:
            self.passive.close()
            self.passive = None

    def finish(self):
        self.close_passive()
        super().finish()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, port):
        self.address = address
        super().__init__((address, port), ControlHandler)


def serve(address, port, duration, ready_file):
    server = Server(address, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    if ready_file:
        pathlib.Path(ready_file).write_text("ready\n")
    time.sleep(duration)
    server.shutdown()
    server.server_close()


# --- client ---------------------------------------------------------------------------


@dataclasses.dataclass
class Transfer:
    """One download: whether all of it arrived, intact."""

    session: str
    what: str
    received: int = 0
    complete: bool = False
    error: str | None = None
    finished_at: float | None = None


def login(server, client_address):
    ftp = ftplib.FTP(timeout=DATA_TIMEOUT, source_address=(client_address, 0))
    ftp.connect(server, CONTROL_PORT)
    ftp.login("lab", "lab")
    ftp.voidcmd("TYPE I")
    return ftp


def read_all(connection, transfer):
    """Everything until EOF, counted in transfer.received as it arrives."""
    chunks = []
    with connection:
        while chunk := connection.recv(65536):
            chunks.append(chunk)
            transfer.received += len(chunk)
    return b"".join(chunks)


def finish(transfer, ftp, name, content, started):
    """Check the download's content and the server's 226."""
    ftp.voidresp()
    transfer.complete = content == expected_content(name)
    if not transfer.complete:
        transfer.error = f"received {len(content)} bytes, not the file"
    transfer.finished_at = round(time.monotonic() - started, 3)


def guarded(transfer, action):
    try:
        action()
    except (OSError, EOFError, ftplib.Error, ValueError) as error:
        transfer.error = f"{type(error).__name__}: {error}"


def download(ftp, transfer, name, passive, started):
    """A whole download over a data connection announced now."""
    def run():
        ftp.set_pasv(passive)
        connection = ftp.transfercmd(f"RETR {name}")
        connection.settimeout(DATA_TIMEOUT)
        finish(transfer, ftp, name, read_all(connection, transfer), started)
    guarded(transfer, run)


def passive_connection(ftp, client_address):
    """PASV now; returns the function that opens the announced data connection."""
    host, port = parse_host_port(ftp.sendcmd("PASV").split("(", 1)[1].split(")")[0])

    def connect():
        return socket.create_connection((host, port), timeout=PHASE_TWO_TIMEOUT,
                                        source_address=(client_address, 0))
    return connect


def active_connection(ftp, client_address):
    """PORT now; returns the function that accepts the data connection the server
    opens to it once asked to RETR."""
    listener = socket.create_server((client_address, 0))
    listener.settimeout(PHASE_TWO_TIMEOUT)
    ftp.sendport(client_address, listener.getsockname()[1])

    def accept():
        with listener:
            connection, _ = listener.accept()
        connection.settimeout(DATA_TIMEOUT)
        return connection
    return accept


def pending_download(ftp, transfer, open_data, started, passive):
    """RETR over the data connection announced in phase one: connected to before
    RETR (passive) or accepted after it (active)."""
    def run():
        connection = open_data() if passive else None
        ftp.putcmd(f"RETR {SMALL_FILE}")
        ftp.getresp()  # 150
        connection = connection or open_data()
        finish(transfer, ftp, SMALL_FILE, read_all(connection, transfer), started)
    guarded(transfer, run)


def run_client(server, addresses, ready_file, go_file, go_timeout):
    started = time.monotonic()
    sessions = dict(zip(SESSIONS, addresses))
    transfers = []
    controls = {}
    failures = {}
    threads = []
    openers = {}
    for session, address in sessions.items():
        try:
            controls[session] = login(server, address)
        except (OSError, EOFError, ftplib.Error) as error:
            failures[session] = f"login: {type(error).__name__}: {error}"
    for session, passive in (("running-passive", True), ("running-active", False)):
        if session in controls:
            transfer = Transfer(session, "running download")
            transfers.append(transfer)
            threads.append(threading.Thread(target=download, args=(
                controls[session], transfer, RUNNING_FILE, passive, started)))
    for session, passive in PENDING_SESSIONS:
        announce, command = ((passive_connection, "PASV") if passive
                             else (active_connection, "PORT"))
        if session in controls:
            try:
                openers[session] = announce(controls[session], sessions[session])
            except (OSError, EOFError, ftplib.Error, ValueError) as error:
                failures[session] = f"{command}: {type(error).__name__}: {error}"
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the running downloads' first blocks are under way
    pathlib.Path(ready_file).write_text("ready\n")
    deadline = time.monotonic() + go_timeout
    while not pathlib.Path(go_file).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for session, passive in PENDING_SESSIONS:
        if session not in openers:
            continue
        ftp = controls[session]
        ftp.timeout = PHASE_TWO_TIMEOUT
        ftp.sock.settimeout(PHASE_TWO_TIMEOUT)
        announced = Transfer(session, "data connection announced before")
        transfers.append(announced)
        pending_download(ftp, announced, openers[session], started, passive)
        fresh = Transfer(session, "data connection announced after")
        transfers.append(fresh)
        download(ftp, fresh, SMALL_FILE, passive, started)
    for thread in threads:
        thread.join(timeout=60)
    for ftp in controls.values():
        with contextlib.suppress(OSError, EOFError, ftplib.Error):
            ftp.close()
    return {"failures": failures,
            "transfers": [dataclasses.asdict(transfer) for transfer in transfers]}


# --- command line ---------------------------------------------------------------------


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python3 -m snat_sync.lab.ftp",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server")
    server.add_argument("--address", required=True)
    server.add_argument("--port", type=int, default=CONTROL_PORT)
    server.add_argument("--duration", type=float, required=True)
    server.add_argument("--ready-file")
    client = commands.add_parser("client")
    client.add_argument("--server", required=True)
    client.add_argument("--addresses", required=True,
                        help=f"{len(SESSIONS)} client addresses, one per session")
    client.add_argument("--ready-file", required=True)
    client.add_argument("--go-file", required=True)
    client.add_argument("--go-timeout", type=float, default=60)
    client.add_argument("--output", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    if arguments.command == "server":
        serve(arguments.address, arguments.port, arguments.duration,
              arguments.ready_file)
        return 0
    addresses = arguments.addresses.split(",")
    if len(addresses) != len(SESSIONS):
        raise SystemExit(f"--addresses: {len(SESSIONS)} addresses needed, "
                         f"got {arguments.addresses!r}")
    report = run_client(arguments.server, addresses, arguments.ready_file,
                        arguments.go_file, arguments.go_timeout)
    pathlib.Path(arguments.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
