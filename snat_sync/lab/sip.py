"""A minimal SIP call for the lab's helper tests: one INVITE with SDP, its 200 OK,
the ACK, then RTP from the callee to the caller's announced media port.

    python3 -m snat_sync.lab.sip server --address 203.0.113.100 --go-file G \
        --duration 40
    python3 -m snat_sync.lab.sip client --address 192.168.100.15 \
        --server 203.0.113.100 --ready-file R --duration 30 --output OUT

The router gives the signalling (UDP 5060) the kernel's sip helper: with SNAT it
rewrites the caller's address and media port in the SDP to the gateway's and
expects RTP from the callee to that port. The server (the callee) answers the
call at once but sends RTP only once --go-file exists (after the failover), so the
RTP can only reach the caller through an expectation the new primary holds. The
client reports when RTP arrived.
"""

import argparse
import json
import pathlib
import socket
import sys
import time

SIP_PORT = 5060
CLIENT_MEDIA_PORT = 20000
SERVER_MEDIA_PORT = 30000
RTP_INTERVAL = 0.05
CALL_ID = "snat-sync-lab-call"


def sdp(address, port):
    return (f"v=0\r\no=lab 1 1 IN IP4 {address}\r\ns=lab\r\nc=IN IP4 {address}\r\n"
            f"t=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def message(start_line, headers, body=""):
    lines = [start_line, *(f"{name}: {value}" for name, value in headers),
             f"Content-Length: {len(body.encode())}", "", ""]
    return ("\r\n".join(lines) + body).encode()


def invite(client, server):
    return message(f"INVITE sip:callee@{server} SIP/2.0", [
        ("Via", f"SIP/2.0/UDP {client}:{SIP_PORT};branch=z9hG4bK-lab-1"),
        ("From", f"<sip:caller@{client}>;tag=caller"),
        ("To", f"<sip:callee@{server}>"),
        ("Call-ID", CALL_ID),
        ("CSeq", "1 INVITE"),
        ("Contact", f"<sip:caller@{client}:{SIP_PORT}>"),
        ("Max-Forwards", "70"),
        ("Content-Type", "application/sdp"),
    ], sdp(client, CLIENT_MEDIA_PORT))


def ack(client, server):
    return message(f"ACK sip:callee@{server} SIP/2.0", [
        ("Via", f"SIP/2.0/UDP {client}:{SIP_PORT};branch=z9hG4bK-lab-2"),
        ("From", f"<sip:caller@{client}>;tag=caller"),
        ("To", f"<sip:callee@{server}>;tag=callee"),
        ("Call-ID", CALL_ID),
        ("CSeq", "1 ACK"),
        ("Max-Forwards", "70"),
    ])


def ok_for(request, server):
    """The 200 OK for an INVITE: its Via, From, Call-ID and CSeq, the callee's SDP."""
    headers = dict(line.split(": ", 1) for line in request_headers(request))
    return message("SIP/2.0 200 OK", [
        ("Via", headers["Via"]),
        ("From", headers["From"]),
        ("To", headers["To"] + ";tag=callee"),
        ("Call-ID", headers["Call-ID"]),
        ("CSeq", headers["CSeq"]),
        ("Contact", f"<sip:callee@{server}:{SIP_PORT}>"),
        ("Content-Type", "application/sdp"),
    ], sdp(server, SERVER_MEDIA_PORT))


def request_headers(text):
    head = text.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    return [line for line in head if ": " in line]


def media_target(text):
    """(address, port) the SDP in a SIP message announces for audio."""
    address = port = None
    for line in text.split("\r\n\r\n", 1)[1].split("\r\n"):
        if line.startswith("c=IN IP4 "):
            address = line.split()[-1]
        elif line.startswith("m=audio "):
            port = int(line.split()[1])
    if address is None or port is None:
        raise ValueError(f"no audio media in {text!r}")
    return address, port


# --- server ---------------------------------------------------------------------------


def serve(address, go_file, duration):
    """Answer the INVITE, then after go_file appears send RTP to its media target."""
    deadline = time.monotonic() + duration
    signalling = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    signalling.bind((address, SIP_PORT))
    signalling.settimeout(0.1)
    media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    media.bind((address, SERVER_MEDIA_PORT))
    target = None
    sequence = 0
    while time.monotonic() < deadline:
        try:
            data, peer = signalling.recvfrom(65535)
        except TimeoutError:
            data = None
        if data is not None:
            text = data.decode(errors="replace")
            if text.startswith("INVITE "):
                target = media_target(text)
                signalling.sendto(ok_for(text, address), peer)
                print(f"INVITE from {peer}, media to {target}", flush=True)
        if target is not None and pathlib.Path(go_file).exists():
            media.sendto(f"RTP {sequence}".encode(), target)
            sequence += 1
            time.sleep(RTP_INTERVAL)


# --- client ---------------------------------------------------------------------------


def call(address, server, ready_file, duration):
    started = time.monotonic()
    signalling = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    signalling.bind((address, SIP_PORT))
    signalling.settimeout(1.0)
    media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    media.bind((address, CLIENT_MEDIA_PORT))
    media.settimeout(0.2)
    report = {"answered": False, "answer_media": None, "rtp_times": [], "error": None}
    for _attempt in range(5):
        signalling.sendto(invite(address, server), (server, SIP_PORT))
        try:
            answer = signalling.recv(65535).decode(errors="replace")
        except TimeoutError:
            continue
        if answer.startswith("SIP/2.0 200"):
            report["answered"] = True
            report["answer_media"] = list(media_target(answer))
            break
    if not report["answered"]:
        report["error"] = "no 200 OK"
    else:
        signalling.sendto(ack(address, server), (server, SIP_PORT))
    pathlib.Path(ready_file).write_text("ready\n")
    while time.monotonic() - started < duration:
        try:
            media.recv(2048)
        except TimeoutError:
            continue
        report["rtp_times"].append(round(time.monotonic() - started, 3))
    report["duration"] = duration
    return report


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python3 -m snat_sync.lab.sip",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server")
    server.add_argument("--address", required=True)
    server.add_argument("--go-file", required=True)
    server.add_argument("--duration", type=float, required=True)
    client = commands.add_parser("client")
    client.add_argument("--address", required=True)
    client.add_argument("--server", required=True)
    client.add_argument("--ready-file", required=True)
    client.add_argument("--duration", type=float, required=True)
    client.add_argument("--output", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    if arguments.command == "server":
        serve(arguments.address, arguments.go_file, arguments.duration)
        return 0
    report = call(arguments.address, arguments.server, arguments.ready_file,
                  arguments.duration)
    pathlib.Path(arguments.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
