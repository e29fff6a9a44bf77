"""Property-based tests of everything that turns outside input into something used.

Any input to the router model, the renderers or the notify argument parser is
either rejected with an InvalidInput that names the field and the value, or it
yields output whose structure holds: balanced braces, no blank lines, every
interpolated value present verbatim and free of whitespace, braces, quotes and '#'.
The conntrackd parsers read whatever conntrackd printed or logged, truncated or
garbled, and never raise. (functional/test_config_accepted.py checks with the real
conntrackd and nft that the rendered files parse.)
"""

import dataclasses
import ipaddress
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile
import types

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from oslo_config import cfg

from snat_sync import conntrackd, failover, options, render, statedir
from snat_sync.errors import InvalidInput
from snat_sync.router import NamespaceFacts, RouterSpec, SyncChannel

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
# Rendering builds a jinja2 environment per call (milliseconds each): fewer examples.
RENDER_SETTINGS = settings(max_examples=80, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.filter_too_much])

# -- strategies ------------------------------------------------------------------------

SHELL_AND_PARSER_CHARACTERS = list(" \t\n\r\x0b\x0c/\\:;$`'\"{}()[]<>|&*?!#~%@,=+^")

hostile_text = st.text(
    alphabet=st.one_of(st.characters(blacklist_categories=("Cs",)),
                       st.sampled_from(SHELL_AND_PARSER_CHARACTERS)),
    max_size=80)


def near(pattern):
    """Text that matches pattern, or nearly: with a hostile character spliced in."""
    good = st.from_regex(pattern, fullmatch=True)
    spliced = st.tuples(good, st.integers(0, 80),
                        st.sampled_from([*SHELL_AND_PARSER_CHARACTERS, "é", "..",
                                         "\0"])
                        ).map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])
    return st.one_of(good, spliced)


# Interface names: plausible ones, conntrackd keywords and hex words, and hostile.
CONNTRACKD_WORDS = ["UDP", "TCP", "Sync", "General", "on", "Off", "yes", "NO", "ftfw",
                    "Alarm", "notrack", "for", "Path", "Type", "a", "beef", "ABCD",
                    "lo", "eth0", "ha-1a2b3c4d-5e", "veth0.100", "eth0@if3", "1abc"]
interface_names = st.one_of(
    near(r"[A-Za-z][A-Za-z0-9_.-]{0,15}"),
    st.from_regex(r"[A-Za-z0-9_.@:-]{1,17}", fullmatch=True),
    st.sampled_from(CONNTRACKD_WORDS),
    hostile_text,
)
router_ids = st.one_of(near(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,66}"), hostile_text)
namespaces = st.one_of(near(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,64}"), hostile_text)

ha_prefix = ipaddress.ip_network("169.254.192.0/18")
v4_addresses = st.one_of(
    st.ip_addresses(v=4, network=ha_prefix),
    st.ip_addresses(v=4),
)
v6_addresses = st.one_of(st.ip_addresses(v=6, network="fd00:a::/64"),
                         st.ip_addresses(v=6))
address_texts = st.one_of(
    v4_addresses.map(str),
    v6_addresses.map(str),
    st.tuples(v6_addresses, hostile_text).map(lambda t: f"{t[0]}%{t[1]}"),
    st.tuples(v4_addresses, st.integers(0, 40)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "::", "224.0.0.18", "ff02::12",
                     "255.255.255.255", "240.0.0.1", "::ffff:169.254.192.1",
                     " 169.254.192.1", "169.254.192.1\n", "169.254.192.01"]),
    hostile_text,
)
addresses = st.one_of(address_texts, v4_addresses, v6_addresses)
vrids = st.one_of(
    st.integers(-3, 260),
    st.integers(-3, 260).map(str),
    st.sampled_from(["07", "7a", " 7", "7 ", "1.5", "0x7", "1e1", "٧", "+7", "",
                     "-0"]),
    st.booleans(), st.none(), st.floats(allow_nan=True), hostile_text,
)
peer_lists = st.one_of(
    st.lists(addresses, max_size=4),
    st.lists(address_texts, max_size=4).map(tuple),
    st.sampled_from([None, 5, "169.254.192.2", b"169.254.192.2"]),
)

FIELD_OF_ARGUMENT = {
    "router_id": "router id",
    "namespace": "namespace",
    "ha_interface": "HA interface",
    "local_address": "local address",
    "vrid": "VRID",
    "primary_address": "primary address",
}
GOOD = {
    "router_id": "r1",
    "namespace": "qrouter-r1",
    "ha_interface": "ha-1a2b3c4d-5e",
    "local_address": "169.254.192.1",
    "peer_addresses": ["169.254.192.2"],
    "vrid": 7,
    "primary_address": None,
}


def good_specs(peers=st.integers(1, 3), family=st.sampled_from([4, 6])):
    """Valid router specs, with every name drawn from its full accepted alphabet."""

    @st.composite
    def build(draw):
        version = draw(family)
        network = ha_prefix if version == 4 else ipaddress.ip_network("fd00:a::/64")
        pool = draw(st.lists(st.ip_addresses(v=version, network=network),
                             min_size=draw(peers) + 1, unique=True))
        try:
            return RouterSpec.create(
                draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)),
                draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True)),
                draw(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,14}", fullmatch=True)),
                str(pool[0]), [str(each) for each in pool[1:]],
                draw(st.integers(1, 254)),
            )
        except InvalidInput:
            assume(False)  # '..' in a name, a keyword as interface, reserved address

    return build()


def assert_clear_rejection(error, allowed_fields):
    assert isinstance(error, InvalidInput)
    assert error.exit_status == 2
    assert error.field in allowed_fields, error
    message = str(error)
    assert message.startswith(f"invalid {error.field} {error.value!r}: "), message
    assert error.reason and error.reason.strip() == error.reason


# -- RouterSpec.create -----------------------------------------------------------------


def assert_single_safe_component(name, limit):
    assert isinstance(name, str) and 0 < len(name.encode()) <= limit
    assert name.isascii() and name.isprintable()
    assert not any(character.isspace() for character in name)
    assert not set(name) & set("/\\:;$`'\"{}()[]<>|&*?!#~%,=+^\0")
    assert ".." not in name and name[0] not in "-."
    assert pathlib.PurePosixPath(name).name == name


@PROPERTY_SETTINGS
@given(router_id=router_ids, namespace=namespaces, ha_interface=interface_names,
       local_address=addresses, peer_addresses=peer_lists, vrid=vrids,
       primary_address=st.one_of(
           st.none(), address_texts,
           st.tuples(v4_addresses, st.integers(0, 33)).map(lambda t: f"{t[0]}/{t[1]}"),
           st.just("169.254.0.7/24")))
@example(router_id="r1", namespace="ns", ha_interface="ha-x", local_address="fe80::1",
         peer_addresses=["fe80::1%ha-x"], vrid=7, primary_address=None)
@example(router_id="r1", namespace="ns", ha_interface="eth0@if3",
         local_address="169.254.192.1", peer_addresses=["169.254.192.2"], vrid=7,
         primary_address=None)
def test_router_spec_is_valid_or_rejected_naming_the_field(**arguments):
    try:
        spec = RouterSpec.create(**arguments)
    except InvalidInput as error:
        assert_clear_rejection(error,
                               set(FIELD_OF_ARGUMENT.values()) | {"peer address"})
        if error.field == "primary address":
            return  # judged against the other addresses; the value may be a part
        argument = next((name for name, field in FIELD_OF_ARGUMENT.items()
                         if field == error.field), "peer_addresses")
        if argument != "peer_addresses":
            given_value = arguments[argument]
            assert error.value is given_value or error.value == given_value
            # The field named is the culprit: with a good value there it passes.
            repaired = {**arguments, argument: GOOD[argument]}
            try:
                RouterSpec.create(**repaired)
            except InvalidInput as again:
                assert again.field != error.field or again.value != error.value
        return
    assert_single_safe_component(spec.router_id, 64)
    assert_single_safe_component(spec.namespace, 63)
    assert_single_safe_component(spec.ha_interface, 15)
    assert spec.ha_interface[0].isalpha() and "@" not in spec.ha_interface
    assert spec.vrid in range(1, 255) and type(spec.vrid) is int
    every = (spec.local_address, *spec.peer_addresses)
    for address in every:
        assert isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address))
        assert not (address.is_multicast or address.is_loopback
                    or address.is_unspecified)
        assert getattr(address, "scope_id", None) is None
        assert address.version == spec.local_address.version
    assert len(set(every)) == len(every) >= 1
    assert spec.peer_addresses or spec.primary_address is not None
    if spec.primary_address is not None:
        assert spec.primary_address.ip not in every
        assert spec.primary_address.version == spec.local_address.version
    assert RouterSpec.from_dict(spec.to_dict()) == spec


@PROPERTY_SETTINGS
@given(data=st.one_of(
    st.dictionaries(st.sampled_from(["router", "namespace", "ha_interface",
                                     "local_address", "peer_addresses", "vrid", "x"]),
                    st.one_of(hostile_text, st.integers(), st.none(),
                              st.lists(address_texts, max_size=2))),
    st.lists(st.integers(), max_size=3), hostile_text, st.none(), st.integers()))
def test_a_spec_read_back_from_disk_is_checked_again(data):
    """spec.json is read from the state directory, which may have been tampered with."""
    try:
        spec = RouterSpec.from_dict(data)
    except InvalidInput as error:
        assert_clear_rejection(error, set(FIELD_OF_ARGUMENT.values())
                               | {"peer address", "router spec"})
        return
    assert RouterSpec.from_dict(spec.to_dict()) == spec


@PROPERTY_SETTINGS
@given(spec=good_specs(), transport=st.one_of(
           st.sampled_from(["auto", "udp", "multicast"]), hostile_text),
       base_port=st.integers(-10, 70000),
       group=st.one_of(st.ip_addresses(v=4, network="224.0.0.0/4"),
                       st.ip_addresses(v=6, network="ff00::/8")).map(str))
def test_sync_channel_is_usable_or_rejected(spec, transport, base_port, group):
    try:
        channel = spec.sync_channel(transport, base_port, group)
    except InvalidInput as error:
        assert_clear_rejection(error, {"transport", "base port", "peer address",
                                       "multicast group"})
        return
    assert isinstance(channel, SyncChannel)
    assert transport in ("auto", "udp", "multicast")
    assert channel.transport in ("udp", "multicast")
    assert channel.port == base_port + spec.vrid and 1 <= channel.port <= 65535
    if channel.transport == "udp":
        assert len(spec.peer_addresses) == 1
    else:
        assert ipaddress.ip_address(group).version == spec.local_address.version
        assert transport == "multicast" or len(spec.peer_addresses) > 1


# -- render_conntrackd_config ----------------------------------------------------------


def option_values(opt):
    """A strategy for a [conntrackd] option, within what options.py accepts."""
    if opt.dest == "multicast_group":
        return st.ip_addresses(v=4, network="224.0.0.0/4").map(str)
    if opt.dest == "ipv6_multicast_group":
        return st.ip_addresses(v=6, network="ff00::/8").map(str)
    if opt.dest == "protocols":
        return st.lists(st.sampled_from(options.SYNCED_PROTOCOLS), min_size=1,
                        unique=True)
    if isinstance(opt, cfg.BoolOpt):
        return st.booleans()
    if isinstance(opt, cfg.IntOpt):
        low = opt.type.min if opt.type.min is not None else 0
        high = opt.type.max if opt.type.max is not None else 2**31 - 1
        return st.one_of(st.integers(low, high), st.sampled_from([low, high]))
    choices = getattr(opt.type, "choices", None)
    if choices:
        return st.sampled_from(list(choices))
    return st.just(opt.default)


@st.composite
def conntrackd_options(draw):
    """Values for every [conntrackd] option, as conf.conntrackd would give them."""
    return types.SimpleNamespace(**{opt.dest: draw(option_values(opt))
                                    for opt in options.conntrackd_opts})


def ha_network_of(spec, widen):
    """The smallest network holding every address of spec, widened by widen bits."""
    every = (spec.local_address, *spec.peer_addresses)
    for prefix in range(spec.local_address.max_prefixlen, -1, -1):
        network = ipaddress.ip_network(f"{spec.local_address}/{prefix}", strict=False)
        if all(address in network for address in every):
            return network.supernet(prefixlen_diff=min(widen, prefix))
    raise AssertionError("unreachable")


state_paths = st.lists(st.from_regex(r"[\w.,:=+@%~-]{1,12}", fullmatch=True)
                       .filter(lambda part: part not in (".", "..")),
                       min_size=1, max_size=4).map(
    lambda parts: "/nonexistent-snat-sync/" + "/".join(parts))


@st.composite
def rendered_configs(draw):
    spec = draw(good_specs())
    settings_options = draw(conntrackd_options())
    facts = NamespaceFacts(ha_network_of(spec, draw(st.integers(0, 8))),
                                  draw(st.integers(1, options.CONNTRACKD_INT_MAX // 2)))
    files = statedir.RouterFiles.under(draw(state_paths), spec.router_id)
    return spec, settings_options, facts, files


def parse_conntrackd_config(text):
    """conntrackd.conf as nested lists of (words, children); asserts its layout."""
    root = []
    stack = [root]
    lines = text.split("\n")
    assert lines[-1] == "", "the file ends with a newline"
    for number, line in enumerate(lines[:-1], 1):
        assert line.strip(), f"line {number} is blank"
        assert line == line.rstrip(), f"line {number} has trailing blanks"
        words = line.split()
        if words[0].startswith("#"):
            assert len(stack) == 1, f"comment inside a section at line {number}"
            continue
        assert "#" not in line and '"' not in line and "'" not in line, line
        if words == ["}"]:
            stack.pop()
            assert stack, f"unbalanced '}}' at line {number}"
            continue
        assert "}" not in line, line
        if words[-1] == "{":
            assert "{" not in line[:-1], line
            children = []
            stack[-1].append((words[:-1], children))
            stack.append(children)
            continue
        assert "{" not in line and 1 <= len(words) <= 2, line
        stack[-1].append((words, None))
    assert len(stack) == 1, "unbalanced '{'"
    return root


def section(tree, *names):
    for name in names:
        matches = [children for words, children in tree
                   if children is not None and words[0] == name]
        assert len(matches) == 1, (name, tree)
        tree = matches[0]
    return tree


def value(tree, key):
    values = [words[1:] for words, children in tree
              if children is None and words[0] == key]
    assert len(values) == 1 and len(values[0]) == 1, (key, values)
    return values[0][0]


def assert_plain(word):
    assert word and not re.search(r"[\s{}\"'#]", word), word


@RENDER_SETTINGS
@given(rendered_configs())
def test_conntrackd_config_is_well_formed_and_holds_every_value(case):
    spec, conntrackd_options_, facts, files = case
    try:
        settings_ = render.conntrackd_settings(spec, conntrackd_options_, facts, files)
    except InvalidInput as error:
        assert_clear_rejection(error, {"peer address", "local address", "transport",
                                       "base port", "multicast group"})
        return
    text = render.render_conntrackd_config(settings_)
    tree = parse_conntrackd_config(text)
    sync = section(tree, "Sync")
    general = section(tree, "General")
    expected = {}
    if settings_.channel.transport == "udp":
        udp = section(sync, "UDP")
        version = spec.local_address.version
        expected.update({
            value(udp, f"IPv{version}_address"): str(spec.local_address),
            value(udp, f"IPv{version}_Destination_Address"):
                str(spec.peer_addresses[0]),
            value(udp, "Port"): str(settings_.channel.port),
            value(udp, "Interface"): spec.ha_interface,
        })
    else:
        multicast = section(sync, "Multicast")
        if spec.local_address.version == 4:
            expected.update({
                value(multicast, "IPv4_address"): conntrackd_options_.multicast_group,
                value(multicast, "IPv4_interface"): str(spec.local_address),
            })
        else:
            expected[value(multicast, "IPv6_address")] = (
                conntrackd_options_.ipv6_multicast_group)
        expected.update({
            value(multicast, "Group"): str(settings_.channel.port),
            value(multicast, "Interface"): spec.ha_interface,
        })
    expected.update({
        value(general, "HashSize"): str(conntrackd_options_.hash_size),
        value(general, "HashLimit"): str(render.hash_limit(
            conntrackd_options_.hash_limit, facts.nf_conntrack_max)),
        value(general, "LogFile"): str(files.log_file),
        value(general, "LockFile"): str(files.lock_file),
        value(section(general, "UNIX"), "Path"): str(files.control_socket),
    })
    for rendered, wanted in expected.items():
        assert rendered == wanted
        assert_plain(rendered)
    for number in (settings_.hash_limit, settings_.hash_size, settings_.channel.port,
                   settings_.socket_buffer_size, settings_.netlink_buffer_size,
                   settings_.netlink_buffer_max_size, settings_.purge_timeout):
        assert 0 < number <= options.CONNTRACKD_INT_MAX
    filter_section = [children for words, children in general
                      if children is not None and words[0] == "Filter"]
    assert len(filter_section) == 1
    accepted = [children for words, children in filter_section[0]
                if words == ["Protocol", "Accept"]][0]
    assert [words[0] for words, _ in accepted] == list(conntrackd_options_.protocols)
    ignored = [children for words, children in filter_section[0]
               if words == ["Address", "Ignore"]][0]
    assert str(facts.ha_network) in [words[1] for words, _ in ignored]
    for line in text.splitlines():
        if line.startswith("#"):
            assert spec.router_id in line or "snat-sync" in line


# -- render_notify_hook ----------------------------------------------------------------

shell_words = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                             blacklist_characters="\0"),
                      min_size=1, max_size=40)


@st.composite
def hooks(draw):
    spec = draw(good_specs())
    files = statedir.RouterFiles.under(draw(state_paths), spec.router_id)
    return dict(
        router_id=spec.router_id,
        files=files,
        conntrackd_binary=draw(st.one_of(shell_words, st.just("conntrackd"))),
        command=draw(st.lists(shell_words, min_size=1, max_size=6)),
        lock_timeout=draw(st.integers(1, options.TIMEOUT_MAX)),
        commit_timeout=draw(st.integers(1, options.TIMEOUT_MAX)),
        guard_namespace=draw(st.one_of(st.none(), st.just(spec.namespace))),
    )


BASH = shutil.which("bash")


@RENDER_SETTINGS
@given(hooks())
def test_notify_hook_quotes_everything_and_parses(arguments):
    hook = render.render_notify_hook(**arguments)
    assert hook.startswith("#!")
    files = arguments["files"]
    for word in (arguments["router_id"], arguments["conntrackd_binary"],
                 files.conntrackd_config, files.transition_lock, files.notify_log,
                 *arguments["command"]):
        assert shlex.quote(str(word)) in hook, word
    if arguments["guard_namespace"]:
        assert shlex.quote(str(files.guard_lift)) in hook
    # Nothing interpolated reaches a comment unquoted except the (safe) router id.
    # Split on newlines only, as bash does (splitlines also breaks on \x1c-\x1e).
    # The comments are the header's: below it a line may start with "#" only as
    # the continuation of a quoted word that holds a newline.
    header = hook.split("\numask 077\n")[0]
    for line in header.split("\n"):
        if line.lstrip().startswith("#") and not line.startswith("#!"):
            for word in arguments["command"]:
                if len(word) > 3 and not re.fullmatch(r"[\w.-]+", word):
                    assert word not in line
    if BASH:
        checked = subprocess.run([BASH, "-n"], input=hook, text=True,
                                 capture_output=True, timeout=10)
        assert checked.returncode == 0, checked.stderr


# -- render_guard ----------------------------------------------------------------------


REFERENCE_SPEC = RouterSpec.create("REFID", "REFNS", "REFIF", "169.254.192.1",
                                   ["169.254.192.2"], 1)


def code_tokens(ruleset):
    """The words of the lines that are not comments."""
    return [line.split() for line in ruleset.splitlines()
            if not line.lstrip().startswith("#")]


@RENDER_SETTINGS
@given(good_specs(), st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True))
def test_guard_rulesets_differ_from_a_reference_only_in_the_values(spec, table):
    """Rendered for any router, each guard ruleset is the reference ruleset with the
    interface and the table name substituted, as whole words: nothing else moves."""
    rendered = render.render_guard(spec, table)
    reference = render.render_guard(REFERENCE_SPEC, "REFTABLE")
    for ruleset, skeleton in zip(rendered, reference):
        assert all(line.strip() for line in ruleset.splitlines()), "blank line"
        words, reference_words = code_tokens(ruleset), code_tokens(skeleton)
        assert len(words) == len(reference_words)
        for line, reference_line in zip(words, reference_words):
            assert len(line) == len(reference_line), (line, reference_line)
            for word, reference_word in zip(line, reference_line):
                expected = (reference_word
                            .replace('"REFIF"', f'"{spec.ha_interface}"')
                            .replace("REFTABLE", table))
                assert word == expected
    assert_plain(spec.ha_interface)
    assert any(f'"{spec.ha_interface}"' in " ".join(line)
               for line in code_tokens(rendered[0]))


# -- parse_notify_arguments ------------------------------------------------------------

ROLE_WORDS = [role.value for role in failover.Role]
STATES = list(failover.KEEPALIVED_STATES)
notify_words = st.one_of(
    st.sampled_from(ROLE_WORDS + STATES + list(failover.KEEPALIVED_TYPES)
                    + ["MASTER ", "master", "Primary", "", "0", "255", "256", "-1",
                       "٣", "1e2", "0x10", "VR_7"]),
    st.integers(-5, 300).map(str),
    hostile_text,
)


@PROPERTY_SETTINGS
@given(st.lists(notify_words, max_size=6))
def test_notify_arguments_give_a_role_or_a_clear_error(arguments):
    before = list(arguments)
    try:
        role = failover.parse_notify_arguments(arguments)
    except InvalidInput as error:
        assert_clear_rejection(error, {"notify state", "notify type", "notify priority",
                                       "notify arguments"})
        assert error.value in arguments or error.value == " ".join(arguments)
        clearly_valid = False
        if len(arguments) == 1:
            clearly_valid = arguments[0] in ROLE_WORDS + STATES
        elif len(arguments) == 4:
            kind, _name, state, priority = arguments
            clearly_valid = (kind in failover.KEEPALIVED_TYPES and state in STATES
                             and re.fullmatch(r"0|[1-9][0-9]{0,2}", priority)
                             and int(priority) <= 255)
        assert not clearly_valid, arguments
        return
    finally:
        assert arguments == before, "the arguments must not be changed"
    assert isinstance(role, failover.Role)
    assert len(arguments) in (1, 4)
    word = arguments[0] if len(arguments) == 1 else arguments[2]
    assert role is failover.KEEPALIVED_STATES.get(word) or role.value == word
    if len(arguments) == 4:
        assert arguments[0] in failover.KEEPALIVED_TYPES
        assert arguments[3].isascii() and arguments[3].isdigit()
        assert 0 <= int(arguments[3]) <= 255


@PROPERTY_SETTINGS
@given(st.sampled_from(failover.KEEPALIVED_TYPES), hostile_text,
       st.sampled_from(STATES), st.integers(0, 255))
def test_every_keepalived_notification_is_understood(kind, name, state, priority):
    role = failover.parse_notify_arguments([kind, name, state, str(priority)])
    assert role is failover.KEEPALIVED_STATES[state]


# -- conntrackd output parsers ---------------------------------------------------------


def cache_stats_text(internal, internal_no_space, external, external_no_space):
    def block(name, active, no_space):
        return (f"cache:{name}\tactive objects:\t\t{active:12d}\n"
                f"\tactive/total entries:\t\t{active:12d}/{active:12d}\n"
                f"\tcreation OK/failed:\t\t{active:12d}/{0:12d}\n"
                f"\t\tno memory available:\t{0:12d}\n"
                f"\t\tno space left in cache:\t{no_space:12d}\n"
                f"\tupdate OK/failed:\t\t{0:12d}/{0:12d}\n")
    return (block("internal", internal, internal_no_space) + "\n"
            + block("external", external, external_no_space))


def commit_log(committed, seconds, failed, already_present):
    prefix = "[Tue Nov 24 20:13:56 2026] (pid=3092) [notice] "
    return "".join(f"{prefix}{line}\n" for line in (
        "committing all external caches",
        f"Committed {committed} new entries",
        f"{already_present} entries ignored, already exist",
        f"{failed} entries can't be committed",
        f"commit has taken {seconds:.6f} seconds",
    ))


counts = st.integers(0, 10**12)
# Digits conntrackd never prints, but a damaged log could hold; within what int()
# and float() take (see test_parsers_survive_numbers_too_long_to_convert).
long_numbers = st.from_regex(r"[0-9]{1,300}", fullmatch=True)


def garbled(text_strategy):
    """Real output, then cut, spliced with garbage or with lines dropped."""
    return st.tuples(text_strategy, st.integers(0, 2000), st.integers(0, 2000),
                     st.one_of(hostile_text, long_numbers, st.just(""))).map(
        lambda t: t[0][:t[1]] + t[3] + t[0][t[1]:][t[2]:])


def assert_sane_count(number, full=None, optional=False):
    if optional and number is None:
        return
    assert type(number) is int and number >= 0
    if full is not None:
        assert number <= full


@PROPERTY_SETTINGS
@given(st.one_of(hostile_text, st.text(), garbled(
    st.builds(cache_stats_text, counts, counts, counts, counts))))
def test_parse_cache_stats_never_raises(text):
    stats = conntrackd.parse_cache_stats(text)
    for field in dataclasses.fields(stats):
        assert_sane_count(getattr(stats, field.name))


@PROPERTY_SETTINGS
@given(counts, counts, counts, counts, st.integers(0, 4000))
def test_parse_cache_stats_of_truncated_output_never_overstates(
        internal, internal_no_space, external, external_no_space, cut):
    full = cache_stats_text(internal, internal_no_space, external, external_no_space)
    whole = conntrackd.parse_cache_stats(full)
    assert (whole.internal_active, whole.internal_no_space, whole.external_active,
            whole.external_no_space) == (internal, internal_no_space, external,
                                         external_no_space)
    part = conntrackd.parse_cache_stats(full[:cut])
    for field in dataclasses.fields(part):
        assert_sane_count(getattr(part, field.name), getattr(whole, field.name))


def assert_sane_commit(result):
    if result is None:
        return
    assert_sane_count(result.committed, optional=True)
    assert_sane_count(result.already_present)
    assert_sane_count(result.failed)
    if result.seconds is not None:
        assert isinstance(result.seconds, float)
        assert math.isfinite(result.seconds) and result.seconds >= 0


@PROPERTY_SETTINGS
@given(st.one_of(hostile_text, st.text(), garbled(
    st.builds(commit_log, counts, st.floats(0, 10**6), counts, counts))))
def test_parse_last_commit_never_raises(text):
    assert_sane_commit(conntrackd.parse_last_commit(text))


@PROPERTY_SETTINGS
@given(counts, st.floats(0, 10**6), counts, counts, st.integers(0, 400))
def test_parse_last_commit_of_a_truncated_log_never_overstates(
        committed, seconds, failed, already_present, cut):
    full = commit_log(committed, seconds, failed, already_present)
    whole = conntrackd.parse_last_commit(full)
    part = conntrackd.parse_last_commit(full[:cut])
    assert_sane_commit(part)
    if part is not None:
        assert part.committed is None or part.committed <= whole.committed
        assert part.failed <= whole.failed
        assert part.already_present <= whole.already_present


@pytest.mark.parametrize("digits", [4301, 400])
def test_parsers_survive_numbers_too_long_to_convert(digits):
    number = "9" * digits
    stats = conntrackd.parse_cache_stats(
        f"cache:internal\tactive objects:\t{number}\n\t\tno space left in cache:\t"
        f"{number}\n")
    for field in dataclasses.fields(stats):
        assert_sane_count(getattr(stats, field.name))
    assert_sane_commit(conntrackd.parse_last_commit(
        f"committing all external caches\nCommitted {number} new entries\n"
        f"{number} entries can't be committed\ncommit has taken {number}.5 seconds\n"))


# -- state paths and the files in them -------------------------------------------------


@PROPERTY_SETTINGS
@given(st.one_of(hostile_text, state_paths,
                 st.lists(hostile_text, min_size=1, max_size=3).map(
                     lambda parts: "/nonexistent-snat-sync/" + "/".join(parts))))
def test_a_state_path_is_plain_and_absolute_or_rejected(text):
    try:
        path = statedir.check_state_path(text)
    except InvalidInput as error:
        assert_clear_rejection(error, {"state path"})
        return
    assert path.is_absolute() and ".." not in path.parts
    assert not re.search(r"[\s\"'{}$#;!`\\\\|&<>*?()\[\]]", str(path)), path
    assert str(path).isprintable()


@PROPERTY_SETTINGS
@given(st.binary(max_size=300), st.sampled_from(["text", "json"]))
def test_damaged_state_files_read_as_text_or_nothing(content, kind):
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory, "last-transition.json")
        path.write_bytes(content)
        if kind == "text":
            assert isinstance(statedir.read_text(path), str)
        else:
            statedir.read_json(path)  # any document, or None; never an exception


def test_state_files_behind_a_symlink_or_a_fifo_read_as_nothing(tmp_path):
    target = tmp_path / "secret"
    target.write_text('{"router": "x"}')
    (tmp_path / "spec.json").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.json")
    for name in ("spec.json", "fifo.json"):
        assert statedir.read_text(tmp_path / name) is None
        assert statedir.read_json(tmp_path / name) is None
