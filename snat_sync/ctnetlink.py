"""ctnetlink messages for a table transfer, pure: a dump of the kernel's
connection table read as entries, and each entry turned into the request that
creates it, NAT mapping included, in another node's kernel.

A dumped entry (IPCTNL_MSG_CT_NEW, NLM_F_MULTI) carries both tuples, status,
timeout, protocol state (TCP's window data), mark and zone. Sent back as
IPCTNL_MSG_CT_NEW with NLM_F_CREATE the kernel takes nearly all of it as it is:
what it does not take is the NAT mapping, which status bits cannot set
(ctnetlink ignores them on create); the mapping must be asked for with
CTA_NAT_SRC / CTA_NAT_DST, and it is read back from the reply tuple: a reply
addressed elsewhere than the original source was source-NAT'ed there, a reply
from elsewhere than the original destination was destination-NAT'ed. The reply
tuple then goes as it was before NAT (the original's, inverted), as
`conntrack -I --src-nat` sends it: given the translated one, the kernel finds
nothing left to translate and leaves IPS_SRC_NAT (or IPS_DST_NAT) unset, and
the entry lists the same but forwards its packets untranslated. The other
attributes the dump adds (CTA_ID, CTA_USE, counters) the kernel ignores on
create, so the rest of the message is passed on unchanged.

Entries are chosen as conntrackd chooses what it replicates: by protocol and
by ignored networks (loopback, the HA network), matched on the original
tuple's addresses.

The same requests serve mapping_sync.py, which also reads new-entry events
(event_filter keeps the kernel from waking it for the protocols it does not
follow), creates expectations and updates an entry's sequence adjustment.

This is the protocol half; table_transfer.py and mapping_sync.py move the bytes.
"""

import dataclasses
import ipaddress
import re
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY, NFNLGRP_CONNTRACK_EXP_NEW = 1, 3, 4
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_CTNETLINK_EXP = 1, 2
CT_NEW = NFNL_SUBSYS_CTNETLINK << 8 | 0
CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | 1
CT_DELETE = NFNL_SUBSYS_CTNETLINK << 8 | 2
EXP_NEW = NFNL_SUBSYS_CTNETLINK_EXP << 8 | 0
EXP_GET = NFNL_SUBSYS_CTNETLINK_EXP << 8 | 1
EXP_DELETE = NFNL_SUBSYS_CTNETLINK_EXP << 8 | 2
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
# Never overwrite: an entry already there came from conntrackd's replication
# after the dump was taken, and is newer.
CREATE_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
DELETE_FLAGS = NLM_F_REQUEST
# An update (CT_NEW on an entry that exists) of its sequence adjustment alone.
UPDATE_FLAGS = NLM_F_REQUEST
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_NAT_SRC, CTA_NAT_DST = 1, 2, 6, 13
CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY = 15, 16
SEQUENCE_UPDATE_ATTRIBUTES = frozenset({CTA_TUPLE_ORIG, CTA_SEQ_ADJ_ORIG,
                                        CTA_SEQ_ADJ_REPLY})
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID = 4, 7
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, CTA_NAT_PROTO = 1, 2, 3
CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP = 4, 5
CTA_PROTONAT_PORT_MIN, CTA_PROTONAT_PORT_MAX = 1, 2
CTA_EXPECT_MASTER, CTA_EXPECT_TUPLE, CTA_EXPECT_HELP_NAME, CTA_EXPECT_CLASS = 1, 2, 6, 9

HEADER = struct.Struct("=IHHII")
ATTRIBUTE = struct.Struct("=HH")
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "ICMP": 1, "IPv6-ICMP": 58, "SCTP": 132,
                    "DCCP": 33, "UDPLITE": 136, "GRE": 47}
# The protocols whose translated port conntrackd 1.4.7 replicates: its sync
# messages carry NAT ports for TCP and UDP only (src/build.c), so the backup's
# kernel picks a port (an ICMP identifier) of its own for a remapped entry of
# any other protocol.
NAT_PORTS_REPLICATED = frozenset({6, 17})


class MalformedMessage(ValueError):
    """Bytes that are not the ctnetlink messages they claim to be."""


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """One direction's tuple: addresses as packed bytes, ports and the ICMP
    identifier as network-order bytes (None where the protocol has none)."""

    source: bytes
    destination: bytes
    protocol: int
    source_port: bytes | None
    destination_port: bytes | None
    identifier: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which entries are transferred: those conntrackd would replicate."""

    protocols: frozenset
    # (address length, network as an integer, mask as an integer) per network
    ignored: tuple
    # (network, mask) of the IPv4 ones, for the fast path
    ipv4_ignored: tuple = ()

    @classmethod
    def of(cls, protocol_names, ignored_networks):
        unknown = [name for name in protocol_names if name not in PROTOCOL_NUMBERS]
        if unknown:
            raise ValueError(f"unknown protocols {unknown}: known are "
                             f"{sorted(PROTOCOL_NUMBERS)}")
        networks = [ipaddress.ip_network(network) for network in ignored_networks]
        ignored = tuple((network.max_prefixlen // 8, int(network.network_address),
                         int(network.netmask)) for network in networks)
        return cls(frozenset(PROTOCOL_NUMBERS[name] for name in protocol_names),
                   ignored, tuple((network, mask) for size, network, mask in ignored
                                  if size == 4))

    def accepts(self, original):
        if original.protocol not in self.protocols:
            return False
        for packed in (original.source, original.destination):
            value = int.from_bytes(packed, "big")
            for size, network, mask in self.ignored:
                if len(packed) == size and value & mask == network:
                    return False
        return True


def attribute(kind, payload):
    length = ATTRIBUTE.size + len(payload)
    return ATTRIBUTE.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind, *children):
    return attribute(kind | NLA_F_NESTED, b"".join(children))


def message(kind, flags, payload, sequence=0):
    return HEADER.pack(HEADER.size + len(payload), kind, flags, sequence, 0) + payload


def dump_request(sequence=1):
    """Ask for the whole table, every family (AF_UNSPEC)."""
    return message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP,
                   struct.pack("=BBH", socket.AF_UNSPEC, 0, 0), sequence)


def split_messages(data):
    """(offset, length, type, flags) of each netlink message in data."""
    found, offset, end = [], 0, len(data)
    while offset + HEADER.size <= end:
        length, kind, flags = struct.unpack_from("=IHH", data, offset)
        if length < HEADER.size or offset + length > end:
            raise MalformedMessage(f"message of length {length} at offset {offset} "
                                   f"of {end} bytes")
        found.append((offset, length, kind, flags))
        offset += (length + 3) & ~3
    if offset < end:
        raise MalformedMessage(f"{end - offset} trailing bytes after the last message")
    return found


def _attributes(data, start, end):
    """{type: (payload start, payload end)} of the attributes in data[start:end]."""
    return dict(_attribute_list(data, start, end))


def endpoints(data, start, end):
    """The Endpoints of a CTA_TUPLE_* payload in data[start:end]."""
    parts = _attributes(data, start, end)
    if CTA_TUPLE_IP not in parts or CTA_TUPLE_PROTO not in parts:
        raise MalformedMessage("tuple without addresses or protocol")
    addresses = _attributes(data, *parts[CTA_TUPLE_IP])
    for source_type, destination_type in ((CTA_IP_V4_SRC, CTA_IP_V4_DST),
                                          (CTA_IP_V6_SRC, CTA_IP_V6_DST)):
        if source_type in addresses and destination_type in addresses:
            source = bytes(data[slice(*addresses[source_type])])
            destination = bytes(data[slice(*addresses[destination_type])])
            break
    else:
        raise MalformedMessage("tuple without a source and destination address")
    protocol_parts = _attributes(data, *parts[CTA_TUPLE_PROTO])
    if CTA_PROTO_NUM not in protocol_parts:
        raise MalformedMessage("tuple without a protocol number")
    protocol = data[protocol_parts[CTA_PROTO_NUM][0]]
    ports = [bytes(data[slice(*protocol_parts[kind])]) if kind in protocol_parts else None
             for kind in (CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID
                          if protocol == 1 else CTA_PROTO_ICMPV6_ID)]
    return Endpoints(source, destination, protocol, *ports)


def nat_attribute(kind, address, port):
    """CTA_NAT_SRC or CTA_NAT_DST mapping to exactly this address (and port)."""
    minimum, maximum = ((CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP) if len(address) == 4
                        else (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP))
    children = [attribute(minimum, address), attribute(maximum, address)]
    if port is not None:
        children.append(nested(CTA_NAT_PROTO, attribute(CTA_PROTONAT_PORT_MIN, port),
                               attribute(CTA_PROTONAT_PORT_MAX, port)))
    return nested(kind, *children)


def nat_mappings(original, reply):
    """The NAT attributes that recreate what the reply tuple shows was done. An
    ICMP identifier is source NAT's "port": the kernel gives a session another
    one when two inside hosts ping with the same identifier through one address."""
    mappings = b""
    if (reply.destination, reply.destination_port, reply.identifier) != (
            original.source, original.source_port, original.identifier):
        mappings += nat_attribute(CTA_NAT_SRC, reply.destination,
                                  reply.destination_port or reply.identifier)
    if (reply.source, reply.source_port) != (original.destination,
                                             original.destination_port):
        mappings += nat_attribute(CTA_NAT_DST, reply.source, reply.source_port)
    return mappings


def _ipv4_tuple_pattern(kind):
    """The bytes of an IPv4 tuple with ports as the kernel dumps it, with the
    addresses, protocol and ports as groups."""
    header = ATTRIBUTE.pack(52, kind | NLA_F_NESTED) + ATTRIBUTE.pack(20, CTA_TUPLE_IP
                                                                      | NLA_F_NESTED)
    return (re.escape(header + ATTRIBUTE.pack(8, CTA_IP_V4_SRC)) + b"(.{4})"
            + re.escape(ATTRIBUTE.pack(8, CTA_IP_V4_DST)) + b"(.{4})"
            + re.escape(ATTRIBUTE.pack(28, CTA_TUPLE_PROTO | NLA_F_NESTED)
                        + ATTRIBUTE.pack(5, CTA_PROTO_NUM)) + b"(.)..."
            + re.escape(ATTRIBUTE.pack(6, CTA_PROTO_SRC_PORT)) + b"(..).."
            + re.escape(ATTRIBUTE.pack(6, CTA_PROTO_DST_PORT)) + b"(..)..")


# Both tuples of an IPv4 entry with ports, at fixed places: most of a router's
# table, read without walking the attributes.
IPV4_TUPLES = re.compile(_ipv4_tuple_pattern(CTA_TUPLE_ORIG)
                         + _ipv4_tuple_pattern(CTA_TUPLE_REPLY), re.DOTALL)


def create_request(data, offset, length, selection):
    """The request that creates the dumped entry data[offset:offset+length]
    elsewhere, or None when the selection leaves it out."""
    body_start, end = offset + HEADER.size + 4, offset + length
    fixed = IPV4_TUPLES.match(data, body_start)
    if fixed is None:
        return _create_request_any(data, offset, length, selection)
    (source, destination, protocol, source_port, destination_port, reply_source,
     reply_destination, _, reply_source_port, reply_destination_port) = fixed.groups()
    if protocol[0] not in selection.protocols:
        return None
    source_value = int.from_bytes(source, "big")
    destination_value = int.from_bytes(destination, "big")
    for network, mask in selection.ipv4_ignored:
        if source_value & mask == network or destination_value & mask == network:
            return None
    # Written out rather than through helpers: this runs once per entry, and
    # most of a table takes this path (200,000 entries in about 0.5 s).
    parts = [None, data[offset + HEADER.size:body_start + IPV4_TUPLE.size], None,
             data[body_start + 2 * IPV4_TUPLE.size:end]]
    if reply_destination != source or reply_destination_port != source_port:
        parts.append(IPV4_NAT.pack(
            IPV4_NAT.size, CTA_NAT_SRC | NLA_F_NESTED, 8, CTA_NAT_V4_MINIP,
            reply_destination, 8, CTA_NAT_V4_MAXIP, reply_destination, 20,
            CTA_NAT_PROTO | NLA_F_NESTED, 6, CTA_PROTONAT_PORT_MIN,
            reply_destination_port, 6, CTA_PROTONAT_PORT_MAX, reply_destination_port))
    if reply_source != destination or reply_source_port != destination_port:
        parts.append(IPV4_NAT.pack(
            IPV4_NAT.size, CTA_NAT_DST | NLA_F_NESTED, 8, CTA_NAT_V4_MINIP,
            reply_source, 8, CTA_NAT_V4_MAXIP, reply_source, 20,
            CTA_NAT_PROTO | NLA_F_NESTED, 6, CTA_PROTONAT_PORT_MIN, reply_source_port,
            6, CTA_PROTONAT_PORT_MAX, reply_source_port))
    if len(parts) == 4:
        return HEADER.pack(length, CT_NEW, CREATE_FLAGS, 0, 0) + data[
            offset + HEADER.size:end]
    parts[0] = HEADER.pack(length + IPV4_NAT.size * (len(parts) - 4), CT_NEW,
                           CREATE_FLAGS, 0, 0)
    parts[2] = IPV4_TUPLE.pack(
        IPV4_TUPLE.size, CTA_TUPLE_REPLY | NLA_F_NESTED, 20,
        CTA_TUPLE_IP | NLA_F_NESTED, 8, CTA_IP_V4_SRC, destination, 8, CTA_IP_V4_DST,
        source, 28, CTA_TUPLE_PROTO | NLA_F_NESTED, 5, CTA_PROTO_NUM, protocol, 6,
        CTA_PROTO_SRC_PORT, destination_port, 6, CTA_PROTO_DST_PORT, source_port)
    return b"".join(parts)


# One IPv4 tuple with ports as the kernel dumps it (IPV4_TUPLES' layout).
IPV4_TUPLE = struct.Struct("=HH HH HH4s HH4s HH HHc3x HH2s2x HH2s2x")


# CTA_NAT_SRC / CTA_NAT_DST to one IPv4 address and port, as nat_attribute
# builds it, in one pack: size, type, then each attribute's length and type
# before its value.
IPV4_NAT = struct.Struct("=HH HH4s HH4s HH HH2s2x HH2s2x")


def _create_request_any(data, offset, length, selection):
    """create_request for any layout: the attributes walked."""
    body_start, end = offset + HEADER.size + 4, offset + length
    listed = _attribute_list(data, body_start, end)
    found = dict(listed)
    if CTA_TUPLE_ORIG not in found or CTA_TUPLE_REPLY not in found:
        raise MalformedMessage("entry without both tuples")
    (original_low, original_high), (reply_low, reply_high) = (
        found[CTA_TUPLE_ORIG], found[CTA_TUPLE_REPLY])
    original = endpoints(data, original_low, original_high)
    reply = endpoints(data, reply_low, reply_high)
    if not selection.accepts(original):
        return None
    mappings = nat_mappings(original, reply)
    if not mappings:
        return message(CT_NEW, CREATE_FLAGS, bytes(data[offset + HEADER.size:end]))
    rest = b"".join(bytes(data[low - ATTRIBUTE.size:high + (-(high - low) % 4)])
                    for kind, (low, high) in listed
                    if kind not in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY))
    payload = (bytes(data[offset + HEADER.size:body_start])
               + nested(CTA_TUPLE_ORIG, bytes(data[original_low:original_high]))
               + untranslated_reply(data, original_low, original_high, reply_low,
                                    reply_high)
               + rest + mappings)
    return message(CT_NEW, CREATE_FLAGS, payload)


SWAPPED_ADDRESSES = {CTA_IP_V4_SRC: CTA_IP_V4_DST, CTA_IP_V4_DST: CTA_IP_V4_SRC,
                     CTA_IP_V6_SRC: CTA_IP_V6_DST, CTA_IP_V6_DST: CTA_IP_V6_SRC}


def untranslated_reply(data, original_low, original_high, reply_low, reply_high):
    """CTA_TUPLE_REPLY as it was before NAT: the original tuple's addresses and
    ports (or ICMP id) swapped round, the rest (ICMP type and code) the reply's."""
    original = _attributes(data, original_low, original_high)
    original_addresses = _attribute_list(data, *original[CTA_TUPLE_IP])
    addresses = [attribute(SWAPPED_ADDRESSES[kind], bytes(data[low:high]))
                 for kind, (low, high) in reversed(original_addresses)
                 if kind in SWAPPED_ADDRESSES]
    original_protocol = {kind: bytes(data[low:high]) for kind, (low, high)
                         in _attribute_list(data, *original[CTA_TUPLE_PROTO])}
    swapped = {CTA_PROTO_SRC_PORT: CTA_PROTO_DST_PORT,
               CTA_PROTO_DST_PORT: CTA_PROTO_SRC_PORT,
               CTA_PROTO_ICMP_ID: CTA_PROTO_ICMP_ID,
               CTA_PROTO_ICMPV6_ID: CTA_PROTO_ICMPV6_ID}
    reply = _attributes(data, reply_low, reply_high)
    protocol = [attribute(kind, original_protocol.get(swapped.get(kind), b"")
                          if kind in swapped else bytes(data[low:high]))
                for kind, (low, high) in _attribute_list(data, *reply[CTA_TUPLE_PROTO])]
    return nested(CTA_TUPLE_REPLY, nested(CTA_TUPLE_IP, *addresses),
                  nested(CTA_TUPLE_PROTO, *protocol))


def _attribute_list(data, start, end):
    """(type, (payload start, payload end)) of each attribute in data[start:end],
    in order."""
    found = []
    while start + ATTRIBUTE.size <= end:
        length, kind = ATTRIBUTE.unpack_from(data, start)
        if length < ATTRIBUTE.size or start + length > end:
            raise MalformedMessage(f"attribute of length {length} at {start}")
        found.append((kind & NLA_TYPE_MASK, (start + ATTRIBUTE.size, start + length)))
        start += (length + 3) & ~3
    return found


def port_remapped(data, offset, length):
    """Whether the entry data[offset:offset+length] (dumped, or a new-entry event)
    has a translated port or ICMP identifier that conntrackd's replication does
    not carry (NAT_PORTS_REPLICATED)."""
    return remapped_original(data, offset, length) is not None


def remapped_original(data, offset, length):
    """The original tuple of the entry data[offset:offset+length] if its port or
    ICMP identifier was translated and conntrackd's replication does not carry
    it (port_remapped), else None."""
    found = _attributes(data, offset + HEADER.size + 4, offset + length)
    if CTA_TUPLE_ORIG not in found or CTA_TUPLE_REPLY not in found:
        raise MalformedMessage("entry without both tuples")
    original = endpoints(data, *found[CTA_TUPLE_ORIG])
    if original.protocol in NAT_PORTS_REPLICATED:
        return None
    reply = endpoints(data, *found[CTA_TUPLE_REPLY])
    if (reply.destination_port, reply.source_port, reply.identifier) == (
            original.source_port, original.destination_port, original.identifier):
        return None
    return original


def replace_requests(create):
    """A create request (of an entry or an expectation) preceded by the delete of
    the one it would collide with: what puts the primary's version in place of
    one that exists."""
    if struct.unpack_from("=H", create, 4)[0] == EXP_NEW:
        return _first_attribute_request(EXP_DELETE, DELETE_FLAGS, CTA_EXPECT_TUPLE,
                                        create, 0, len(create)) + create
    return delete_request(create, 0, len(create)) + create


def expectation_helper(data, offset, length):
    """The helper name of the expectation data[offset:offset+length], or None."""
    found = _attributes(data, offset + HEADER.size + 4, offset + length)
    if CTA_EXPECT_HELP_NAME not in found:
        return None
    return bytes(data[slice(*found[CTA_EXPECT_HELP_NAME])]).rstrip(b"\0").decode(
        errors="replace")


def master_get_request(data, offset, length):
    """The request that reads the master entry of the expectation
    data[offset:offset+length] (CTA_EXPECT_MASTER holds its original tuple)."""
    return _first_attribute_request(CT_GET, NLM_F_REQUEST, CTA_EXPECT_MASTER, data,
                                    offset, length)


def sequence_update_request(data, offset, length):
    """The update that gives the dumped entry's sequence adjustment to its copy
    elsewhere, or None if it has none. A helper that rewrites a segment to
    another length (the ftp helper's PORT with SNAT) shifts the connection's
    sequence numbers from then on, and the kernel raises no event for it: a
    copy without the shift forwards the next segments unshifted, and the
    connection stalls."""
    found = _attributes(data, offset + HEADER.size + 4, offset + length)
    if CTA_SEQ_ADJ_ORIG not in found and CTA_SEQ_ADJ_REPLY not in found:
        return None
    payload = bytes(data[offset + HEADER.size:offset + HEADER.size + 4]) + b"".join(
        nested(kind, bytes(data[slice(*found[kind])]))
        for kind in (CTA_TUPLE_ORIG, CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY)
        if kind in found)
    return message(CT_NEW, UPDATE_FLAGS, payload)


def expectation_get_request(data, offset, length):
    """The request that reads the expectation data[offset:offset+length] as the
    kernel holds it now, by its tuple."""
    return _first_attribute_request(EXP_GET, NLM_F_REQUEST, CTA_EXPECT_TUPLE, data,
                                    offset, length)


def expectation_create_request(data, offset, length):
    """The request that creates the dumped expectation elsewhere: its master
    entry, helper, class and NAT as they are (the kernel ignores CTA_EXPECT_ID
    on create)."""
    return message(EXP_NEW, CREATE_FLAGS,
                   bytes(data[offset + HEADER.size:offset + length]))


# Where a new-entry event's original protocol number lies (ctnetlink writes the
# original tuple first: addresses, then CTA_PROTO_NUM), by family.
EVENT_PROTOCOL_OFFSET = {socket.AF_INET: 52, socket.AF_INET6: 76}
EVENT_FAMILY_OFFSET = 16
# nlmsg_type's high byte: the header is in host order.
EVENT_SUBSYSTEM_OFFSET = 5 if sys.byteorder == "little" else 4
BPF_LD_B_ABS, BPF_JEQ_K, BPF_RET_K = 0x30, 0x15, 0x06
SOCK_FILTER = struct.Struct("=HBBI")


def event_filter(protocols):
    """A classic BPF program (sock_filter structs) for a conntrack event socket
    that lets through every expectation event but, of the entries' events, only
    those of these protocol numbers, so that a daemon interested in a few
    protocols is not woken for the whole table.

        0        A = the message's subsystem
        1        expectations: accept
        2        A = family
        3        family != AF_INET: go to IPv6
        4        A = original protocol (IPv4 layout)
        5..      one test per protocol: accept
        5+n      drop
        IPv6     family != AF_INET6: drop
                 A = original protocol (IPv6 layout)
                 one test per protocol: accept
        8+2n     drop
        9+2n     accept
    Jumps count the instructions skipped."""
    protocols = sorted(protocols)
    count = len(protocols)
    if count > 99:
        raise ValueError(f"an event filter takes at most 99 protocols, not {count}")
    program = [(BPF_LD_B_ABS, 0, 0, EVENT_SUBSYSTEM_OFFSET),
               (BPF_JEQ_K, 7 + 2 * count, 0, NFNL_SUBSYS_CTNETLINK_EXP),
               (BPF_LD_B_ABS, 0, 0, EVENT_FAMILY_OFFSET),
               (BPF_JEQ_K, 0, count + 2, socket.AF_INET),
               (BPF_LD_B_ABS, 0, 0, EVENT_PROTOCOL_OFFSET[socket.AF_INET])]
    program += [(BPF_JEQ_K, 3 + 2 * count - index, 0, protocol)
                for index, protocol in enumerate(protocols)]
    program += [(BPF_RET_K, 0, 0, 0),
                (BPF_JEQ_K, 0, count + 1, socket.AF_INET6),
                (BPF_LD_B_ABS, 0, 0, EVENT_PROTOCOL_OFFSET[socket.AF_INET6])]
    program += [(BPF_JEQ_K, count - index, 0, protocol)
                for index, protocol in enumerate(protocols)]
    program += [(BPF_RET_K, 0, 0, 0), (BPF_RET_K, 0, 0, 0xFFFFFFFF)]
    return b"".join(SOCK_FILTER.pack(*instruction) for instruction in program)


def delete_request(data, offset, length):
    """The request that deletes, elsewhere, the entry of a destroy event
    data[offset:offset+length]: its family and original tuple."""
    return _first_attribute_request(CT_DELETE, DELETE_FLAGS, CTA_TUPLE_ORIG, data,
                                    offset, length)


def get_request(data, offset, length):
    """The request that reads the entry of the event data[offset:offset+length]
    as the kernel holds it now: its family and original tuple."""
    return _first_attribute_request(CT_GET, NLM_F_REQUEST, CTA_TUPLE_ORIG, data,
                                    offset, length)


def _first_attribute_request(kind, flags, key, data, offset, length):
    """A request of kind naming the message's entry (or expectation) by one
    attribute, its tuple, with the message's family."""
    body_start, end = offset + HEADER.size + 4, offset + length
    found = _attributes(data, body_start, end)
    if key not in found:
        raise MalformedMessage(f"a message without attribute {key}")
    low, high = found[key]
    payload = (bytes(data[offset + HEADER.size:body_start])
               + nested(key, bytes(data[low:high])))
    return message(kind, flags, payload)


def check_requests(data):
    """How many creates and deletes data holds; MalformedMessage unless it is
    nothing but creates and deletes of conntrack entries and expectations, and
    updates of an entry's sequence adjustment: a receiver writes what a peer
    sent into its kernel, and takes no other kind of request."""
    creates = deletes = 0
    for offset, length, kind, flags in split_messages(data):
        if kind in (CT_NEW, EXP_NEW) and flags == CREATE_FLAGS:
            creates += 1
        elif kind in (CT_DELETE, EXP_DELETE) and flags == DELETE_FLAGS:
            deletes += 1
        elif kind == CT_NEW and flags == UPDATE_FLAGS:
            updated = {attribute_kind for attribute_kind, _ in _attribute_list(
                data, offset + HEADER.size + 4, offset + length)}
            if not updated <= SEQUENCE_UPDATE_ATTRIBUTES:
                raise MalformedMessage(
                    f"an update of attributes {sorted(updated)}: only sequence "
                    "adjustments are accepted")
        else:
            raise MalformedMessage(f"request type {kind:#x} flags {flags:#x}: only "
                                   "creates and deletes of conntrack entries and "
                                   "expectations, and updates of sequence "
                                   "adjustments, are accepted")
    return creates, deletes


def errors(data):
    """The errno of each NLMSG_ERROR in data that reports a failure."""
    failed = []
    for offset, length, kind, _flags in split_messages(data):
        if kind == NLMSG_ERROR and length >= HEADER.size + 4:
            code = struct.unpack_from("=i", data, offset + HEADER.size)[0]
            if code:
                failed.append(-code)
    return failed
