"""Who turns on which NAT helper: the `auto` decision and the p2pd options of each mode (no network)."""
import pytest

from node.cli import build_parser
from node.dht import AddressError, RelayCaps, guess_reachability, p2p_options

BOOT = "/ip4/127.0.0.1/tcp/31337/p2p/QmBoot"


def test_auto_is_off_on_loopback_and_public_for_a_bootstrap_or_an_announced_address():
    assert guess_reachability("127.0.0.1", [BOOT], None) == "off"
    assert guess_reachability("127.0.0.1", [], None) == "off"
    assert guess_reachability("203.0.113.7", [], None) == "public"                      # a bootstrap
    assert guess_reachability("192.168.1.20", [BOOT.replace("127.0.0.1", "203.0.113.9")],
                              ["/ip4/203.0.113.20/tcp/31337"]) == "public"                # port forwarded


def test_modes_turn_on_only_their_helpers_and_public_relays_within_caps():
    off, off_flags = p2p_options("off", [])
    assert not (off["auto_nat"] or off["use_relay"] or off["use_auto_relay"] or off["nat_port_map"]) and not off_flags
    public, flags = p2p_options("public", [], RelayCaps(max_reservations=8, buffer_bytes=4096))
    assert public["force_reachability"] == "public" and not public["use_auto_relay"] and not public["nat_port_map"]
    assert flags["relayService"] and flags["relayMaxReservations"] == 8 and flags["relayBufferSize"] == 4096
    assert p2p_options("public", [], RelayCaps(max_reservations=0))[1] == {"relayService": False}
    private, flags = p2p_options("private", [BOOT])
    assert private["use_auto_relay"] and private["trusted_relays"] == [BOOT] and private["client_mode"]
    assert flags == {"relayService": False}
    with pytest.raises(AddressError, match="needs a relay"):
        p2p_options("private", [])


def test_join_defaults_to_auto_with_the_documented_relay_caps():
    args = build_parser().parse_args(["join", "--stage", "1"])
    assert args.reachability == "auto"
    caps = RelayCaps(args.relay_max_reservations, args.relay_max_circuits, args.relay_buffer_kib * 1024)
    assert caps == RelayCaps()
