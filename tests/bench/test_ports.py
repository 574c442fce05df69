"""The bench's ports come from outside the ephemeral range (a churn's TIME_WAIT cannot hold them)."""
import random
import socket

from hypothesis import given, strategies as st

from sockgraft.bench import ports


@given(st.integers(1024, 65535), st.integers(0, 40000))
def test_candidates_stay_outside_the_ephemeral_range(low, width):
    high = min(65535, low + width)
    got = ports.candidates(low, high, random.Random(1))
    assert all(ports.LOWEST <= p <= 65535 and not low <= p <= high for p in got)
    assert got or (low <= ports.LOWEST and high == 65535)  # no room outside it: none


def test_free_port_is_free_and_not_ephemeral():
    low, high = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert not low <= port <= high and port >= ports.LOWEST
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
