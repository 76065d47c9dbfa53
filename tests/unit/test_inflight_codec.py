"""GET_INFLIGHT_FD / SET_INFLIGHT_FD payload codec (vhost-user "Inflight description")."""

from __future__ import annotations

import pytest
from dvmm_shared.vhost_user.message import InflightInfo, MessageError
from hypothesis import given
from hypothesis import strategies as st


def test_layout_is_the_padded_c_struct() -> None:
    raw = InflightInfo(0x1122, 0x3344, 2, 128).encode()
    assert len(raw) == 24  # sizeof(VhostUserInflight): 20 bytes of fields, padded
    assert raw == (0x1122).to_bytes(8, "little") + (0x3344).to_bytes(8, "little") + bytes(
        [2, 0, 128, 0, 0, 0, 0, 0])


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF))
def test_round_trip(size: int, offset: int, queues: int, qsize: int) -> None:
    info = InflightInfo(size, offset, queues, qsize)
    assert InflightInfo.decode(info.encode()) == info
    assert InflightInfo.decode(info.encode()[:20]) == info  # a packed sender


@pytest.mark.parametrize("size", [0, 8, 19, 21, 23, 25, 64])
def test_wrong_sizes_are_refused(size: int) -> None:
    with pytest.raises(MessageError, match="inflight description"):
        InflightInfo.decode(bytes(size))
