"""Whatever the router model accepts renders files the real conntrackd and nft parse.

conntrackd has no flag that only checks a configuration, but `conntrackd -C FILE -s`
parses the file before it tries to reach the daemon's socket. Measured with
conntrackd 1.4.7, every outcome exits 1; stderr tells them apart:
    parsed, no daemon   "[ERROR] can't connect: is conntrackd running? ..."
    parse error         "[ERROR] parsing config file in line (N), symbol 'X': syntax
                         error"
    other refusals      "[ERROR] Path is longer than 107 characters", ...
and, after a parse, a warning per value it did not like, e.g.
    "[warning] 169.254.300.1 is not a valid IPv4 address" (and carries on!)
    "[warning] ha0 is an invalid interface" (no such interface here: expected, as
        the files are checked outside the router's namespace)
So a file is accepted when stderr has the "can't connect" error, no other error,
and no warning except the one about the router's own interface.

The nft guard rulesets are checked with `nft -c -f` (parse and validate, commit
nothing) inside a scratch namespace.

A rejected example proves only that the rejection is clean, so the strategies draw
input of the accepted kind about nine times in ten (`router_inputs`: names, addresses
and options as the model takes them) and the hostile kind (any text, any address)
the tenth time; each property counts the examples that reached the real parser
and fails below MIN_PARSED of its EXAMPLES.
"""

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oslo_config import types as oslo_types

from snat_sync import guard, options, render, statedir
from snat_sync import router as router_module
from snat_sync.errors import InvalidInput
from snat_sync.router import NamespaceFacts, RouterSpec

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("conntrackd") or not shutil.which("nft"),
    reason="needs root, conntrackd and nft")

EXAMPLES = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])

# Examples that must reach conntrackd's (or nft's) parser per property and run,
# of max_examples (100): 79 to 99 did in six runs; about 10 did before.
MIN_PARSED = 60

CANT_CONNECT = "can't connect"
LINE = re.compile(r"^\[[^]]*\] \(pid=\d+\) \[(\w+)\] (.*)$")


def conntrackd_verdict(config_path, interface):
    """None if conntrackd parsed config_path cleanly, else what it complained of."""
    result = subprocess.run(["conntrackd", "-C", str(config_path), "-s"],
                            capture_output=True, text=True, timeout=10)
    complaints = []
    connected = False
    for line in (result.stderr + result.stdout).splitlines():
        if not line.strip():
            continue
        match = LINE.match(line)
        level, message = match.groups() if match else ("?", line)
        if level == "ERROR" and message.startswith(CANT_CONNECT):
            connected = True
        elif level == "warning" and message == f"{interface} is an invalid interface":
            pass
        else:
            complaints.append(line)
    if result.returncode != 1 or not connected:
        complaints.append(f"exit {result.returncode}, no {CANT_CONNECT!r}")
    return complaints or None


@pytest.fixture(scope="module")
def short_directory():
    """A short, root-only directory: socket paths in it stay under 108 bytes."""
    directory = tempfile.mkdtemp(prefix="ssp-", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch_namespace():
    name = f"ssprop-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=10)


# Interface names from the whole range: plausible, conntrackd keywords, hex words,
# names the kernel takes but conntrackd does not, and hostile text.
valid_looking_interfaces = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,15}",
                                         fullmatch=True)
interface_names = st.one_of(
    valid_looking_interfaces, valid_looking_interfaces,
    st.from_regex(r"[A-Za-z0-9_.@:-]{1,16}", fullmatch=True),
    st.sampled_from(["UDP", "Sync", "on", "NO", "ftfw", "Alarm", "for", "Path",
                     "CLOSED", "a", "beef", "ABCD", "fa-1", "eth0@if3", "1abc",
                     "10.0.0.1", "ha..x", "lo", "abcde", "yesno"]),
    st.text(max_size=16),
)
valid_looking_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
router_ids = st.one_of(valid_looking_ids, valid_looking_ids, st.text(max_size=20))
state_parts = st.from_regex(r"[\w.,:=+@%~-]{1,10}", fullmatch=True).filter(
    lambda part: part not in (".", ".."))


def accepted_by(check):
    """A filter: the model takes the value (InvalidInput otherwise)."""

    def accepted(value):
        try:
            check(value)
        except InvalidInput:
            return False
        return True

    return accepted


# The accepted kind: what the model's rules allow, drawn from their whole range
# (keywords and hex words are what the model refuses for conntrackd's sake).
accepted_interfaces = st.one_of(
    st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,14}", fullmatch=True),
    st.from_regex(r"(ha|qr|qg|eth|br|vlan|bond)-?[0-9a-f]{1,10}", fullmatch=True),
).filter(accepted_by(router_module._interface))
accepted_router_ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
    st.uuids().map(str),
).filter(accepted_by(router_module.check_router_id))


@st.composite
def addresses(draw):
    version = draw(st.sampled_from([4, 4, 6]))
    network = ipaddress.ip_network("169.254.192.0/18" if version == 4
                                   else "fd00:a::/64")
    strategy = st.one_of(st.ip_addresses(v=version, network=network),
                         st.ip_addresses(v=version))
    pool = draw(st.lists(strategy, min_size=2, max_size=4, unique=True))
    return [str(address) for address in pool]


def option_value(opt):
    """Edge and default values of a [conntrackd] option, as options.py allows."""
    if opt.dest == "multicast_group":
        return st.ip_addresses(v=4, network="224.0.0.0/4").map(str)
    if opt.dest == "ipv6_multicast_group":
        return st.ip_addresses(v=6, network="ff00::/8").map(str)
    if opt.dest == "protocols":
        return st.lists(st.sampled_from(options.SYNCED_PROTOCOLS), min_size=1,
                        unique=True)
    if isinstance(opt.type, oslo_types.Boolean):
        return st.booleans()
    if isinstance(opt.type, oslo_types.Integer):
        return st.sampled_from([opt.type.min or 0, opt.type.max or 2**31 - 1,
                                opt.default])
    choices = getattr(opt.type, "choices", None)
    if choices:
        return st.sampled_from(list(choices))
    return st.just(opt.default)


@st.composite
def conntrackd_options(draw):
    return types.SimpleNamespace(**{opt.dest: draw(option_value(opt))
                                    for opt in options.conntrackd_opts})


@st.composite
def accepted_addresses(draw, transport):
    """A local address and its peers that the transport takes: one peer for udp,
    several for multicast (and auto) too, one family."""
    version = draw(st.sampled_from([4, 4, 6]))
    networks = (["169.254.192.0/18", "10.0.0.0/8", "192.0.2.0/24"] if version == 4
                else ["fd00:a::/64", "2001:db8::/32", "fe80::/64"])
    network = ipaddress.ip_network(draw(st.sampled_from(networks)))
    size = 2 if transport == "udp" else draw(st.integers(2, 4))
    pool = draw(st.lists(st.ip_addresses(network=network), min_size=size,
                         max_size=size, unique=True))
    return [str(address) for address in pool]


@st.composite
def router_inputs(draw):
    """(router id, HA interface, address pool, conntrackd options): of the accepted
    kind nine times in ten, of any kind the tenth."""
    conntrackd = draw(conntrackd_options())
    # Not 0 or 9: Hypothesis draws the ends of a range more often than the middle.
    if draw(st.integers(0, 9)) == 4:
        return (draw(router_ids), draw(interface_names), draw(addresses()),
                conntrackd)
    return (draw(accepted_router_ids), draw(accepted_interfaces),
            draw(accepted_addresses(conntrackd.transport)), conntrackd)


def ha_network_of(local, peers):
    for prefix in range(local.max_prefixlen, -1, -1):
        network = ipaddress.ip_network(f"{local}/{prefix}", strict=False)
        if all(peer in network for peer in peers):
            return network
    raise AssertionError("unreachable")


def test_accepted_input_renders_a_config_conntrackd_parses(short_directory):
    parsed = []

    @EXAMPLES
    @given(case=router_inputs(), vrid=st.integers(1, 254), state_part=state_parts,
           nf_conntrack_max=st.sampled_from(
               [1, 65536, 262144, options.CONNTRACKD_INT_MAX // 2]))
    def check(case, vrid, state_part, nf_conntrack_max):
        if accepted_input_renders_a_config_conntrackd_parses(
                short_directory, *case, vrid, state_part, nf_conntrack_max):
            parsed.append(case[0])

    check()
    assert len(parsed) >= MIN_PARSED, (
        f"only {len(parsed)} examples reached conntrackd's parser")


def accepted_input_renders_a_config_conntrackd_parses(
        short_directory, router_id, ha_interface, pool, conntrackd_options_, vrid,
        state_part, nf_conntrack_max):
    """The property for one example; True if the config reached conntrackd."""
    try:
        spec = RouterSpec.create(router_id, "qrouter-x", ha_interface, pool[0],
                                 pool[1:], vrid)
        files = statedir.RouterFiles.under(f"{short_directory}/{state_part}",
                                           spec.router_id)
        files.check_socket_path()
        facts = NamespaceFacts(
            ha_network_of(spec.local_address, spec.peer_addresses), nf_conntrack_max)
        settings_ = render.conntrackd_settings(spec, conntrackd_options_, facts, files)
    except InvalidInput as error:
        # Rejected with a clear message: the other half of the property.
        assert str(error).startswith(f"invalid {error.field} {error.value!r}: ")
        return False
    config = os.path.join(short_directory, "conntrackd.conf")
    with open(config, "w") as stream:
        stream.write(render.render_conntrackd_config(settings_))
    complaints = conntrackd_verdict(config, spec.ha_interface)
    assert complaints is None, (complaints, open(config).read())
    assert not os.path.exists(files.directory), "conntrackd -s must not create files"
    return True


def test_accepted_input_renders_guard_rulesets_nft_parses(scratch_namespace,
                                                          short_directory):
    parsed = []

    @EXAMPLES
    @given(case=router_inputs())
    def check(case):
        router_id, ha_interface, pool, _ = case
        if accepted_input_renders_guard_rulesets_nft_parses(
                scratch_namespace, short_directory, router_id, ha_interface, pool):
            parsed.append(router_id)

    check()
    assert len(parsed) >= MIN_PARSED, f"only {len(parsed)} examples reached nft"


def accepted_input_renders_guard_rulesets_nft_parses(
        scratch_namespace, short_directory, router_id, ha_interface, pool):
    """The property for one example; True if the rulesets reached nft."""
    try:
        spec = RouterSpec.create(router_id, "qrouter-x", ha_interface, pool[0],
                                 pool[1:], 7)
    except InvalidInput:
        return False
    for ruleset in render.render_guard(spec, guard.TABLE):
        path = os.path.join(short_directory, "guard.nft")
        with open(path, "w") as stream:
            stream.write(ruleset)
        result = subprocess.run(
            ["ip", "netns", "exec", scratch_namespace, "nft", "-c", "-f", path],
            capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, (result.stderr, ruleset)
    return True


@pytest.mark.parametrize("interface", ["eth0@if3", "1abc", "UDP", "on", "beef",
                                       "ha-x"])
def test_the_verdict_tells_a_parse_error_from_a_clean_parse(short_directory,
                                                            interface):
    """The oracle itself: conntrackd's verdict on hand-written configurations."""
    config = os.path.join(short_directory, "probe.conf")
    with open(config, "w") as stream:
        stream.write(
            "Sync {\n\tMode FTFW {\n\t}\n\tUDP {\n\t\tIPv4_address 169.254.192.1\n"
            "\t\tIPv4_Destination_Address 169.254.192.2\n\t\tPort 3787\n"
            f"\t\tInterface {interface}\n\t}}\n}}\nGeneral {{\n"
            f"\tLockFile {short_directory}/probe.lock\n"
            f"\tUNIX {{\n\t\tPath {short_directory}/probe.ctl\n\t}}\n}}\n")
    complaints = conntrackd_verdict(config, interface)
    if interface == "ha-x":
        assert complaints is None
    else:
        assert complaints and any("syntax error" in line for line in complaints)
    rejected = (pytest.raises(InvalidInput) if interface != "ha-x"
                else contextlib.nullcontext())
    with rejected:
        RouterSpec.create("r1", "ns", interface, "169.254.192.1", ["169.254.192.2"], 7)
