"""ctnetlink.py: dumped entries become the requests that create them elsewhere,
NAT mapping included; the receiver's check takes only creates and deletes."""

import socket
import struct

import pytest

from snat_sync import ctnetlink as ct
from snat_sync import options

GATEWAY = "203.0.113.10"
HA_NETWORK = "169.254.192.0/18"
SELECTION = ct.Selection.of(["TCP", "UDP", "ICMP"], ["127.0.0.0/8", "::1/128",
                                                      HA_NETWORK])


def packed(address):
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET,
                            address)


def tuple_attribute(kind, source, destination, protocol, source_port=None,
                    destination_port=None):
    v6 = ":" in source
    addresses = ct.nested(ct.CTA_TUPLE_IP,
                          ct.attribute(ct.CTA_IP_V6_SRC if v6 else ct.CTA_IP_V4_SRC,
                                       packed(source)),
                          ct.attribute(ct.CTA_IP_V6_DST if v6 else ct.CTA_IP_V4_DST,
                                       packed(destination)))
    protocol_parts = [ct.attribute(ct.CTA_PROTO_NUM, bytes([protocol]))]
    if source_port is not None:
        protocol_parts += [ct.attribute(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", source_port)),
                           ct.attribute(ct.CTA_PROTO_DST_PORT,
                                        struct.pack("!H", destination_port))]
    return ct.nested(kind, addresses, ct.nested(ct.CTA_TUPLE_PROTO, *protocol_parts))


def dumped_entry(original, reply, kind=ct.CT_NEW, flags=ct.NLM_F_MULTI, family=None):
    """An entry as the kernel dumps it: both tuples first, then status and timeout."""
    family = family or (socket.AF_INET6 if ":" in original[0] else socket.AF_INET)
    payload = (struct.pack("=BBH", family, 0, 0)
               + tuple_attribute(ct.CTA_TUPLE_ORIG, *original)
               + tuple_attribute(ct.CTA_TUPLE_REPLY, *reply)
               + ct.attribute(3, struct.pack("!I", 0x18e))  # CTA_STATUS
               + ct.attribute(7, struct.pack("!I", 300)))  # CTA_TIMEOUT
    return ct.message(kind, flags, payload, sequence=77)


def snat_entry(protocol=6, client="10.0.0.5", server="198.51.100.1", port=40001):
    return dumped_entry((client, server, protocol, 5555, 443),
                        (server, GATEWAY, protocol, 443, port))


def request_for(data):
    return ct.create_request(data, 0, len(data), SELECTION)


def top_attributes(request):
    """{type: payload bytes} of a request's attributes after the nfgenmsg."""
    found = ct._attributes(request, ct.HEADER.size + 4, len(request))
    return {kind: request[low:high] for kind, (low, high) in found.items()}


def nat_range(payload):
    parts = ct._attributes(payload, 0, len(payload))
    low, high = parts[ct.CTA_NAT_V4_MINIP if ct.CTA_NAT_V4_MINIP in parts
                      else ct.CTA_NAT_V6_MINIP]
    address = payload[low:high]
    port = None
    if ct.CTA_NAT_PROTO in parts:
        proto = payload[slice(*parts[ct.CTA_NAT_PROTO])]
        ports = ct._attributes(proto, 0, len(proto))
        port = struct.unpack("!H", proto[slice(*ports[ct.CTA_PROTONAT_PORT_MIN])])[0]
    return socket.inet_ntop(socket.AF_INET6 if len(address) == 16 else socket.AF_INET,
                            address), port


def test_a_snat_entry_becomes_an_exclusive_create_with_its_source_mapping():
    request = request_for(snat_entry())
    assert ct.check_requests(request) == (1, 0)
    length, kind, flags, sequence, _pid = ct.HEADER.unpack_from(request)
    assert (length, kind, flags, sequence) == (len(request), ct.CT_NEW,
                                               ct.CREATE_FLAGS, 0)
    attributes = top_attributes(request)
    assert nat_range(attributes[ct.CTA_NAT_SRC]) == (GATEWAY, 40001)
    assert ct.CTA_NAT_DST not in attributes


def reply_endpoints(request):
    low, high = ct._attributes(request, ct.HEADER.size + 4, len(request))[
        ct.CTA_TUPLE_REPLY]
    return ct.endpoints(request, low, high)


def test_the_reply_goes_as_it_was_before_nat():
    """Given the translated reply the kernel finds nothing to translate: the entry
    lists the same but carries no IPS_SRC_NAT, and forwards untranslated."""
    reply = reply_endpoints(request_for(snat_entry()))
    assert (reply.source, reply.destination) == (packed("198.51.100.1"),
                                                 packed("10.0.0.5"))
    assert (reply.source_port, reply.destination_port) == (struct.pack("!H", 443),
                                                           struct.pack("!H", 5555))


def test_the_other_dumped_attributes_are_passed_on_unchanged():
    entry = snat_entry()
    request = request_for(entry)
    attributes = top_attributes(request)
    for kind, payload in top_attributes(entry).items():
        if kind != ct.CTA_TUPLE_REPLY:
            assert attributes[kind] == payload


def test_an_entry_without_nat_gets_no_mapping():
    entry = dumped_entry(("10.0.0.5", "10.0.1.9", 17, 5353, 53),
                         ("10.0.1.9", "10.0.0.5", 17, 53, 5353))
    request = request_for(entry)
    assert request[ct.HEADER.size:] == entry[ct.HEADER.size:]
    assert not {ct.CTA_NAT_SRC, ct.CTA_NAT_DST} & top_attributes(request).keys()


def test_a_destination_nat_entry_gets_its_destination_mapping():
    entry = dumped_entry(("198.51.100.7", GATEWAY, 6, 6000, 80),
                         ("10.0.0.5", "198.51.100.7", 6, 8080, 6000))
    attributes = top_attributes(request_for(entry))
    assert nat_range(attributes[ct.CTA_NAT_DST]) == ("10.0.0.5", 8080)
    assert ct.CTA_NAT_SRC not in attributes


@pytest.mark.parametrize("entry", [
    snat_entry(),
    snat_entry(protocol=17),
    dumped_entry(("198.51.100.7", GATEWAY, 6, 6000, 80),
                 ("10.0.0.5", "10.0.0.1", 6, 8080, 6001)),  # both mappings
    dumped_entry(("10.0.0.5", "10.0.1.9", 17, 5353, 53),
                 ("10.0.1.9", "10.0.0.5", 17, 53, 5353)),
])
def test_the_fixed_offset_path_builds_what_walking_the_attributes_builds(entry):
    assert ct.IPV4_TUPLES.match(entry, ct.HEADER.size + 4) is not None
    assert request_for(entry) == ct._create_request_any(entry, 0, len(entry), SELECTION)


def test_ipv6_and_icmp_entries_take_the_general_path():
    v6 = dumped_entry(("2001:db8::5", "2001:db8:1::9", 6, 5555, 443),
                      ("2001:db8:1::9", "2001:db8::1", 6, 443, 40001))
    assert ct.IPV4_TUPLES.match(v6, ct.HEADER.size + 4) is None
    request = request_for(v6)
    assert nat_range(top_attributes(request)[ct.CTA_NAT_SRC]) == ("2001:db8::1", 40001)
    assert reply_endpoints(request) == ct.Endpoints(
        packed("2001:db8:1::9"), packed("2001:db8::5"), 6, struct.pack("!H", 443),
        struct.pack("!H", 5555))
    icmp = dumped_entry(("10.0.0.5", "198.51.100.1", 1), ("198.51.100.1", GATEWAY, 1))
    assert ct.IPV4_TUPLES.match(icmp, ct.HEADER.size + 4) is None
    request = request_for(icmp)
    assert nat_range(top_attributes(request)[ct.CTA_NAT_SRC]) == (GATEWAY, None)
    assert reply_endpoints(request) == ct.Endpoints(
        packed("198.51.100.1"), packed("10.0.0.5"), 1, None, None)


def test_an_icmp_reply_keeps_its_type_and_takes_the_original_id():
    def echo(kind, source, destination, icmp_type, icmp_id):
        return ct.nested(kind, ct.nested(
            ct.CTA_TUPLE_IP, ct.attribute(ct.CTA_IP_V4_SRC, packed(source)),
            ct.attribute(ct.CTA_IP_V4_DST, packed(destination))), ct.nested(
            ct.CTA_TUPLE_PROTO, ct.attribute(ct.CTA_PROTO_NUM, b"\x01"),
            ct.attribute(ct.CTA_PROTO_ICMP_ID, struct.pack("!H", icmp_id)),
            ct.attribute(5, bytes([icmp_type])), ct.attribute(6, b"\0")))
    entry = ct.message(ct.CT_NEW, ct.NLM_F_MULTI, struct.pack(
        "=BBH", socket.AF_INET, 0, 0)
        + echo(ct.CTA_TUPLE_ORIG, "10.0.0.5", "198.51.100.1", 8, 77)
        + echo(ct.CTA_TUPLE_REPLY, "198.51.100.1", GATEWAY, 0, 1077))
    request = request_for(entry)
    assert top_attributes(request)[ct.CTA_TUPLE_REPLY] == echo(
        ct.CTA_TUPLE_REPLY, "198.51.100.1", "10.0.0.5", 0, 77)[4:]


def test_an_entry_with_its_tuples_not_first_is_found_by_type():
    entry = snat_entry()
    body = entry[ct.HEADER.size + 4:]
    original_length = struct.unpack_from("=H", body)[0]
    reply_length = struct.unpack_from("=H", body, original_length)[0]
    tuples = body[:original_length + reply_length]
    moved = (entry[:ct.HEADER.size + 4] + body[original_length + reply_length:]
             + tuples)
    moved = ct.HEADER.pack(len(moved), ct.CT_NEW, ct.NLM_F_MULTI, 0, 0) + moved[16:]
    assert nat_range(top_attributes(request_for(moved))[ct.CTA_NAT_SRC]) == (
        GATEWAY, 40001)


@pytest.mark.parametrize("entry", [
    snat_entry(protocol=132),  # SCTP, not selected
    dumped_entry(("169.254.192.1", "169.254.192.2", 17, 3781, 3781),
                 ("169.254.192.2", "169.254.192.1", 17, 3781, 3781)),  # HA network
    dumped_entry(("127.0.0.1", "127.0.0.1", 6, 40000, 22),
                 ("127.0.0.1", "127.0.0.1", 6, 22, 40000)),
    dumped_entry(("::1", "::1", 6, 40000, 22), ("::1", "::1", 6, 22, 40000)),
])
def test_entries_conntrackd_would_not_replicate_are_left_out(entry):
    assert request_for(entry) is None


def test_a_destination_in_an_ignored_network_is_left_out_too():
    entry = dumped_entry(("10.0.0.5", "169.254.192.2", 6, 5555, 22),
                         ("169.254.192.2", "10.0.0.5", 6, 22, 5555))
    assert request_for(entry) is None
    assert ct._create_request_any(entry, 0, len(entry), SELECTION) is None


def test_an_unknown_protocol_name_is_refused_by_name():
    with pytest.raises(ValueError, match="QUIC"):
        ct.Selection.of(["TCP", "QUIC"], [])


def destroy_event():
    return dumped_entry(("10.0.0.5", "198.51.100.1", 6, 5555, 443),
                        ("198.51.100.1", GATEWAY, 6, 443, 40001),
                        kind=ct.CT_DELETE, flags=0)


def test_a_destroy_event_becomes_a_delete_of_its_original_tuple():
    event = destroy_event()
    request = ct.delete_request(event, 0, len(event))
    assert ct.check_requests(request) == (0, 1)
    attributes = top_attributes(request)
    assert set(attributes) == {ct.CTA_TUPLE_ORIG}
    assert attributes[ct.CTA_TUPLE_ORIG] == tuple_attribute(
        ct.CTA_TUPLE_ORIG, "10.0.0.5", "198.51.100.1", 6, 5555, 443)[4:]


def test_many_requests_in_one_frame_are_counted():
    event = destroy_event()
    frame = request_for(snat_entry()) * 3 + ct.delete_request(event, 0, len(event))
    assert ct.check_requests(frame) == (3, 1)


@pytest.mark.parametrize("kind, flags", [
    (ct.CT_NEW, ct.NLM_F_REQUEST | ct.NLM_F_CREATE),  # would it overwrite? no EXCL
    (ct.CT_NEW, ct.NLM_F_MULTI),  # a dumped entry, not a request
    (ct.CT_GET, ct.NLM_F_REQUEST | ct.NLM_F_DUMP),
    (ct.CT_DELETE, ct.NLM_F_REQUEST | ct.NLM_F_DUMP),
    (ct.NFNL_SUBSYS_CTNETLINK + 1 << 8, ct.NLM_F_REQUEST),  # another subsystem
])
def test_the_receiver_takes_nothing_but_creates_and_deletes(kind, flags):
    good = request_for(snat_entry())
    with pytest.raises(ct.MalformedMessage, match=f"{kind:#x}"):
        ct.check_requests(good + ct.message(kind, flags, b"\0" * 4))


@pytest.mark.parametrize("cut", [1, 15, 17])
def test_a_truncated_frame_is_malformed(cut):
    good = request_for(snat_entry())
    with pytest.raises(ct.MalformedMessage):
        ct.check_requests(good + good[:cut])


def test_a_message_claiming_more_than_it_has_is_malformed():
    entry = bytearray(snat_entry())
    struct.pack_into("=I", entry, 0, len(entry) + 8)
    with pytest.raises(ct.MalformedMessage, match="length"):
        ct.split_messages(bytes(entry))


def test_a_tuple_without_addresses_is_malformed():
    payload = (struct.pack("=BBH", socket.AF_INET, 0, 0)
               + ct.nested(ct.CTA_TUPLE_ORIG, ct.nested(ct.CTA_TUPLE_PROTO,
                                                        ct.attribute(1, b"\x06")))
               + tuple_attribute(ct.CTA_TUPLE_REPLY, "1.1.1.1", "2.2.2.2", 6, 1, 2))
    entry = ct.message(ct.CT_NEW, ct.NLM_F_MULTI, payload)
    with pytest.raises(ct.MalformedMessage, match="tuple"):
        request_for(entry)


def test_the_kernels_answers_yield_the_failures_only():
    def answer(code):
        return ct.message(ct.NLMSG_ERROR, 0, struct.pack("=i", -code) + b"\0" * 16)
    assert ct.errors(answer(0) + answer(17) + answer(2) + answer(0)) == [17, 2]


def test_every_protocol_the_options_offer_can_be_selected():
    selection = ct.Selection.of(options.SYNCED_PROTOCOLS, [])
    assert selection.protocols == {6, 17, 1, 58, 132, 33}


def echo_entry(request_id, reply_id, family=socket.AF_INET):
    """A ping session's entry: ICMP echo (or ICMPv6), SNAT'ed to the gateway."""
    v6 = family == socket.AF_INET6
    client, server, gateway = (("2001:db8::5", "2001:db8:1::9", "2001:db8::1") if v6
                               else ("10.0.0.5", "198.51.100.1", GATEWAY))
    protocol, id_type = (58, ct.CTA_PROTO_ICMPV6_ID) if v6 else (1, ct.CTA_PROTO_ICMP_ID)

    def echo(kind, source, destination, icmp_type, icmp_id):
        return ct.nested(kind, ct.nested(
            ct.CTA_TUPLE_IP,
            ct.attribute(ct.CTA_IP_V6_SRC if v6 else ct.CTA_IP_V4_SRC, packed(source)),
            ct.attribute(ct.CTA_IP_V6_DST if v6 else ct.CTA_IP_V4_DST,
                         packed(destination))), ct.nested(
            ct.CTA_TUPLE_PROTO, ct.attribute(ct.CTA_PROTO_NUM, bytes([protocol])),
            ct.attribute(id_type, struct.pack("!H", icmp_id)),
            ct.attribute(id_type + 1, bytes([icmp_type])), ct.attribute(id_type + 2, b"\0")))
    return ct.message(ct.CT_NEW, 0, struct.pack("=BBH", family, 0, 0)
                      + echo(ct.CTA_TUPLE_ORIG, client, server, 8, request_id)
                      + echo(ct.CTA_TUPLE_REPLY, server, gateway, 0, reply_id))


def test_a_remapped_icmp_identifier_goes_in_the_source_mapping():
    """The kernel gives the second of two sessions pinging with identifier 77
    through one address another identifier; the create asks for exactly it."""
    assert nat_range(top_attributes(request_for(echo_entry(77, 1077)))[
        ct.CTA_NAT_SRC]) == (GATEWAY, 1077)
    assert nat_range(top_attributes(request_for(echo_entry(77, 77)))[
        ct.CTA_NAT_SRC]) == (GATEWAY, 77)


@pytest.mark.parametrize("entry, remapped", [
    (echo_entry(77, 1077), True),
    (echo_entry(77, 1077, socket.AF_INET6), True),
    (echo_entry(77, 77), False),
    (snat_entry(protocol=132, port=40001), True),   # SCTP, port 5555 -> 40001
    (snat_entry(protocol=132, port=5555), False),   # SCTP, the address only
    (snat_entry(protocol=6, port=40001), False),    # conntrackd carries TCP's port
    (snat_entry(protocol=17, port=40001), False),   # and UDP's
])
def test_only_translated_ports_conntrackd_does_not_carry_count_as_remapped(
        entry, remapped):
    assert ct.port_remapped(entry, 0, len(entry)) is remapped


def test_a_replacement_deletes_the_entry_then_creates_the_primarys():
    create = request_for(echo_entry(77, 1077))
    replacement = ct.replace_requests(create)
    assert ct.check_requests(replacement) == (1, 1)
    (_, delete_length, kind, _), (offset, length, *_rest) = ct.split_messages(replacement)
    assert kind == ct.CT_DELETE
    assert replacement[offset:offset + length] == create
    deleted = top_attributes(replacement[:delete_length])
    assert deleted[ct.CTA_TUPLE_ORIG] == top_attributes(create)[ct.CTA_TUPLE_ORIG]


def run_classic_bpf(program, packet):
    """What the kernel's socket filter returns for packet: the three instructions
    event_filter uses, and a load past the end drops, as in the kernel."""
    instructions = [ct.SOCK_FILTER.unpack_from(program, offset)
                    for offset in range(0, len(program), ct.SOCK_FILTER.size)]
    accumulator, pc = 0, 0
    while True:
        code, jump_true, jump_false, k = instructions[pc]
        pc += 1
        if code == ct.BPF_LD_B_ABS:
            if k >= len(packet):
                return 0
            accumulator = packet[k]
        elif code == ct.BPF_JEQ_K:
            pc += jump_true if accumulator == k else jump_false
        elif code == ct.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"instruction {code:#x}")


@pytest.mark.parametrize("event, passes", [
    (echo_entry(77, 1077), True),
    (echo_entry(77, 77, socket.AF_INET6), True),
    (snat_entry(protocol=132), True),
    (snat_entry(protocol=6), False),
    (snat_entry(protocol=17), False),
    (dumped_entry(("2001:db8::5", "2001:db8:1::9", 6, 5555, 443),
                  ("2001:db8:1::9", "2001:db8::1", 6, 443, 40001)), False),
    (dumped_entry(("2001:db8::5", "2001:db8:1::9", 132, 5555, 443),
                  ("2001:db8:1::9", "2001:db8::1", 132, 443, 40001)), True),
    (snat_entry(protocol=1)[:40], False),  # too short to hold a protocol
])
def test_the_event_filter_passes_only_the_protocols_followed(event, passes):
    program = ct.event_filter({1, 58, 132})
    assert bool(run_classic_bpf(program, event)) is passes


def test_the_event_filter_reads_the_family_first():
    """An IPv4 event whose byte at the IPv6 offset happens to be a followed
    protocol, and an event of another family, do not pass."""
    program = ct.event_filter({1})
    other_family = bytearray(echo_entry(77, 1077))
    other_family[ct.EVENT_FAMILY_OFFSET] = socket.AF_UNSPEC
    assert run_classic_bpf(program, bytes(other_family)) == 0
    v4_tcp = bytearray(snat_entry(protocol=6))
    v4_tcp[ct.EVENT_PROTOCOL_OFFSET[socket.AF_INET6]] = 1
    assert run_classic_bpf(program, bytes(v4_tcp)) == 0


def expectation_event(helper=b"sip", expectation_class=1):
    """A new-expectation event as ctnetlink writes one: tuple, mask, master,
    timeout, id, flags, class, helper name."""
    expected = tuple_attribute(ct.CTA_EXPECT_TUPLE, "198.51.100.1", GATEWAY, 17, 0,
                               30001)
    master = tuple_attribute(1, "10.0.0.5", "198.51.100.1", 17, 5060, 5060)
    mask = tuple_attribute(3, "255.255.255.255", "255.255.255.255", 17, 0, 65535)
    payload = (struct.pack("=BBH", socket.AF_INET, 0, 0) + expected + mask + master
               + ct.attribute(4, struct.pack("!I", 180))  # CTA_EXPECT_TIMEOUT
               + ct.attribute(5, struct.pack("!I", 12345))  # CTA_EXPECT_ID
               + ct.attribute(8, struct.pack("!I", 0))  # CTA_EXPECT_FLAGS
               + ct.attribute(ct.CTA_EXPECT_CLASS, struct.pack("!I", expectation_class))
               + ct.attribute(ct.CTA_EXPECT_HELP_NAME, helper + b"\0"))
    return ct.message(ct.EXP_NEW, ct.NLM_F_CREATE | ct.NLM_F_EXCL, payload)


def test_every_expectation_event_passes_the_filter_whatever_its_protocol():
    assert run_classic_bpf(ct.event_filter({1}), expectation_event()) != 0
    assert run_classic_bpf(ct.event_filter(set()), expectation_event()) != 0
    assert run_classic_bpf(ct.event_filter(set()), echo_entry(77, 1077)) == 0


def test_an_expectation_tells_its_helper():
    event = expectation_event(b"sip", 1)
    assert ct.expectation_helper(event, 0, len(event)) == "sip"


def test_an_expectation_is_replaced_by_its_tuple_then_created_as_it_is():
    event = expectation_event()
    create = ct.expectation_create_request(event, 0, len(event))
    assert create[ct.HEADER.size:] == event[ct.HEADER.size:]
    replacement = ct.replace_requests(create)
    assert ct.check_requests(replacement) == (1, 1)
    (_, delete_length, kind, flags), (offset, length, kind_2, flags_2) = (
        ct.split_messages(replacement))
    assert (kind, flags, kind_2, flags_2) == (ct.EXP_DELETE, ct.DELETE_FLAGS,
                                              ct.EXP_NEW, ct.CREATE_FLAGS)
    assert top_attributes(replacement[:delete_length]) == {
        ct.CTA_EXPECT_TUPLE: top_attributes(create)[ct.CTA_EXPECT_TUPLE]}
    read = ct.expectation_get_request(event, 0, len(event))
    assert struct.unpack_from("=HH", read, 4) == (ct.EXP_GET, ct.NLM_F_REQUEST)


def test_an_event_filter_for_too_many_protocols_is_refused():
    with pytest.raises(ValueError, match="not 100"):
        ct.event_filter(set(range(100)))


def entry_with_sequence_shift():
    """An FTP control connection's entry after a rewritten PORT: the kernel
    dumps its shift in CTA_SEQ_ADJ_ORIG (correction position, offsets)."""
    entry = snat_entry(protocol=6)
    shift = ct.nested(ct.CTA_SEQ_ADJ_ORIG, ct.attribute(1, struct.pack("!I", 1000)),
                      ct.attribute(2, struct.pack("!I", 0)),
                      ct.attribute(3, struct.pack("!I", 2)))
    body = entry[ct.HEADER.size:] + shift
    return ct.HEADER.pack(ct.HEADER.size + len(body), ct.CT_NEW, 0, 0, 0) + body


def test_a_sequence_shift_becomes_an_update_of_the_shift_alone():
    entry = entry_with_sequence_shift()
    update = ct.sequence_update_request(entry, 0, len(entry))
    assert struct.unpack_from("=HH", update, 4) == (ct.CT_NEW, ct.UPDATE_FLAGS)
    sent = top_attributes(update)
    original = top_attributes(entry)
    assert sent == {ct.CTA_TUPLE_ORIG: original[ct.CTA_TUPLE_ORIG],
                    ct.CTA_SEQ_ADJ_ORIG: original[ct.CTA_SEQ_ADJ_ORIG]}
    assert ct.check_requests(update) == (0, 0)
    plain = snat_entry()
    assert ct.sequence_update_request(plain, 0, len(plain)) is None


def test_an_update_of_anything_but_the_sequence_shift_is_refused():
    entry = snat_entry()
    update = ct.HEADER.pack(len(entry), ct.CT_NEW, ct.UPDATE_FLAGS, 0, 0) + entry[
        ct.HEADER.size:]
    with pytest.raises(ct.MalformedMessage, match="only sequence adjustments"):
        ct.check_requests(update)


def test_an_expectations_master_is_read_by_its_original_tuple():
    event = expectation_event()
    read = ct.master_get_request(event, 0, len(event))
    assert struct.unpack_from("=HH", read, 4) == (ct.CT_GET, ct.NLM_F_REQUEST)
    assert top_attributes(read) == {
        ct.CTA_TUPLE_ORIG: top_attributes(event)[ct.CTA_EXPECT_MASTER]}
