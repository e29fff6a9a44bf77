"""The unsolicited neighbour advertisement's bytes (snat_sync.neighbour_advertisement)."""

import ipaddress

import pytest

from snat_sync import neighbour_advertisement

MAC = bytes.fromhex("fa163e0a0b0c")


def test_the_advertisement_carries_router_and_override_flags_target_and_mac():
    message = neighbour_advertisement.packet(
        ipaddress.IPv6Address("2001:db8::1"), MAC)
    assert len(message) == 32
    assert message[0] == 136  # neighbour advertisement
    assert message[1] == 0  # code
    assert message[2:4] == b"\0\0"  # checksum: the kernel's
    assert message[4] == 0xA0  # router and override, not solicited
    assert message[5:8] == b"\0\0\0"
    assert message[8:24] == ipaddress.IPv6Address("2001:db8::1").packed
    assert message[24:26] == bytes([2, 1])  # target link-layer address, 8 octets
    assert message[26:32] == MAC


def test_a_mac_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="6 bytes, not 5"):
        neighbour_advertisement.packet(ipaddress.IPv6Address("2001:db8::1"), MAC[:5])


def test_the_command_line_refuses_an_ipv4_address(capsys):
    with pytest.raises(SystemExit) as refused:
        neighbour_advertisement.main(["qg-1", "198.18.0.1"])
    assert refused.value.code == 2
    assert "'198.18.0.1' is not an IPv6 address" in capsys.readouterr().err


def test_a_missing_device_is_named(capsys):
    assert neighbour_advertisement.main(["no-such-port", "2001:db8::1"]) == 1
    assert ("neighbour advertisement for 2001:db8::1 on no-such-port: No such device"
            in capsys.readouterr().err)
