"""The pure parts of the lab's FTP, SIP and SCTP endpoints (no root, no namespaces)."""

import socket
import struct

import pytest

from snat_sync.lab import ftp
from snat_sync.lab import helper_failover
from snat_sync.lab import sctp
from snat_sync.lab import sip
from snat_sync.lab import topology


def test_ftp_host_port_round_trips_the_way_pasv_and_port_carry_it():
    text = ftp.format_host_port("203.0.113.100", 40123)
    assert text == "203,0,113,100,156,187"
    assert ftp.parse_host_port(f"({text}).") == ("203.0.113.100", 40123)
    with pytest.raises(ValueError):
        ftp.parse_host_port("1,2,3")


def test_ftp_files_are_named_by_their_size_and_pace():
    assert ftp.parse_file_name(ftp.RUNNING_FILE) == (256, 25)
    content = ftp.expected_content("paced-3-0")
    assert len(content) == 3 * ftp.BLOCK_SIZE
    assert content[ftp.BLOCK_SIZE:ftp.BLOCK_SIZE + 1] == b"\x01"
    with pytest.raises(ValueError):
        ftp.parse_file_name("secret-1-1")


def test_ftp_running_download_outlasts_a_failover():
    blocks, interval = ftp.parse_file_name(ftp.RUNNING_FILE)
    assert blocks * interval / 1000 > 6


def test_sip_invite_announces_the_callers_media_and_the_answer_the_callees():
    invite = sip.invite("192.168.100.14", "203.0.113.100").decode()
    assert invite.startswith("INVITE sip:callee@203.0.113.100 SIP/2.0\r\n")
    head, body = invite.split("\r\n\r\n", 1)
    assert f"Content-Length: {len(body.encode())}" in head.split("\r\n")
    assert sip.media_target(invite) == ("192.168.100.14", sip.CLIENT_MEDIA_PORT)
    answer = sip.ok_for(invite, "203.0.113.100").decode()
    assert answer.startswith("SIP/2.0 200 OK\r\n")
    assert "CSeq: 1 INVITE" in answer and f"Call-ID: {sip.CALL_ID}" in answer
    assert sip.media_target(answer) == ("203.0.113.100", sip.SERVER_MEDIA_PORT)


def test_sip_message_without_audio_is_refused():
    with pytest.raises(ValueError):
        sip.media_target("SIP/2.0 200 OK\r\n\r\nv=0\r\n")


def test_sctp_checksum_is_crc32c():
    assert sctp.crc32c(b"123456789") == 0xE3069283
    assert sctp.crc32c(b"") == 0


def ipv4(source, payload):
    return (bytes([0x45]) + b"\0" * 11 + socket.inet_aton(source) + b"\0" * 4
            + payload)


def test_sctp_packet_parses_back_with_its_chunks_and_checksum():
    cookie = sctp.parameter(sctp.PARAMETER_STATE_COOKIE, b"\x00\x00\x00\x07")
    data = sctp.packet(5001, 9900, 42, sctp.chunk(sctp.INIT_ACK,
                                                  sctp.init_body(7) + cookie))
    source, source_port, destination_port, tag, chunks = sctp.parse(
        ipv4("203.0.113.100", data))
    assert (source, source_port, destination_port, tag) == (
        "203.0.113.100", 5001, 9900, 42)
    [(kind, body)] = chunks
    assert kind == sctp.INIT_ACK and struct.unpack("!I", body[:4]) == (7,)
    assert sctp.parameters(body[16:]) == {sctp.PARAMETER_STATE_COOKIE: b"\0\0\0\7"}


def test_sctp_packet_with_a_bad_checksum_is_ignored():
    data = bytearray(sctp.packet(5001, 9900, 42, sctp.chunk(sctp.HEARTBEAT)))
    data[-1] ^= 0xFF
    assert sctp.parse(ipv4("203.0.113.100", bytes(data))) is None


def test_chunks_and_parameters_are_padded_to_four_bytes():
    assert len(sctp.chunk(sctp.COOKIE_ECHO, b"abcde")) == 12
    assert len(sctp.parameter(sctp.PARAMETER_HEARTBEAT_INFO, b"abc")) == 8


def test_helper_rules_give_helpers_and_let_new_connections_out_only_to_them():
    router = topology.Router("r1", "x-r1", *topology.router_legs("abc", "r1"),
                             *topology.HA_ADDRESSES, 150)
    rules = [" ".join(rule) for rule in helper_failover.operator_rules(router)]
    assert "-t raw -A PREROUTING -i qr-abc-in -p tcp --dport 21 -j CT --helper ftp" \
        in rules
    assert "-t raw -A PREROUTING -i qr-abc-in -p udp --dport 5060 -j CT --helper sip" \
        in rules
    assert rules[-1] == "-A FORWARD -j DROP"
    assert any("--chunk-types any INIT" in rule for rule in rules)


def test_each_kind_of_client_has_its_own_addresses():
    used = [*helper_failover.FTP_ADDRESSES, helper_failover.SIP_ADDRESS,
            *helper_failover.SCTP_ADDRESSES]
    assert len(set(used)) == len(used)
    assert len(helper_failover.FTP_ADDRESSES) == len(ftp.SESSIONS)
    assert set(used) <= set(topology.CLIENT_ADDRESSES)
