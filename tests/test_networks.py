"""classifier.addresses.Networks: the one membership test both front ends use for
allowed_clients and xforward_clients."""

from __future__ import annotations

import pytest

from classifier.addresses import Networks


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("::ffff:10.1.0.9", True),  # a dual-stack socket's view of an IPv4 client
        ("fe80::1%eth0", True),  # the zone is not part of the address
        ("2001:db8::1", False),
        ("", False),
        ("not-an-address", False),
        ("[UNAVAILABLE]", False),
    ],
)
def test_membership(address: str, inside: bool) -> None:
    nets = Networks(["127.0.0.0/8", "10.1.0.0/16", "fe80::/10"])
    assert (address in nets) is inside


def test_empty_list_allows_nobody() -> None:
    assert "127.0.0.1" not in Networks([])


def test_host_bits_are_accepted_like_postfix_mynetworks() -> None:
    assert "192.0.2.77" in Networks(["192.0.2.1/24"])
