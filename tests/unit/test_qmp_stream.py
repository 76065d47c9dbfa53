"""QMP's JSON stream and request checks (pure): values split anywhere, hostile input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dvmm_core.qmp.protocol import (
    NO_ID,
    ArgType,
    Param,
    QmpError,
    check_arguments,
    encode,
    event,
    parse_request,
    timestamp,
)
from dvmm_core.qmp.stream import JsonInputError, JsonStreamer
from hypothesis import given, settings
from hypothesis import strategies as st

STREAM = (b'{"execute": "qmp_capabilities"}\r\n{ "execute":"query-status", "id": [1, {"a": "}"}]}'
          b"{'execute': 'it\\'s', \"arguments\": {'k': \"say \\\"hi\\\"\"}}"
          b'  42 "text" [1, [2, [3]]]\n')
EXPECTED: list[Any] = [
    {"execute": "qmp_capabilities"},
    {"execute": "query-status", "id": [1, {"a": "}"}]},
    {"execute": "it's", "arguments": {"k": 'say "hi"'}},
    42, "text", [1, [2, [3]]],
]


def feed_all(chunks: list[bytes], **kw: int) -> list[Any]:
    streamer = JsonStreamer(**kw)
    out: list[Any] = []
    for chunk in chunks:
        out += streamer.feed(chunk)
    return out


def test_values_come_out_in_order() -> None:
    assert feed_all([STREAM]) == EXPECTED


def test_every_split_position_gives_the_same_values() -> None:
    for cut in range(len(STREAM) + 1):
        assert feed_all([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


def test_one_byte_at_a_time() -> None:
    assert feed_all([STREAM[i:i + 1] for i in range(len(STREAM))]) == EXPECTED


def errors(out: list[Any]) -> list[str]:
    return [str(e) for e in out if isinstance(e, JsonInputError)]


def test_control_character_resets_the_parser_then_it_serves_again() -> None:
    # qmp-spec.rst: a client forces the parser into a known-good state with a
    # control character (or 0xFF).
    out = feed_all([b'{"execute": "stop"', b"\x01", b'{"execute": "cont"}'])
    assert errors(out) == ["JSON parse error, invalid character 0x01"]
    assert out[-1] == {"execute": "cont"}
    out = feed_all([b'{"execute": "st\xff', b'{"execute": "cont"}'])
    assert len(errors(out)) == 1 and out[-1] == {"execute": "cont"}


@pytest.mark.parametrize("bad", [b'{"execute": }', b'{"a": NaN}', b"{'a' 1}", b"tru ",
                                 b'{"a": "\xc3\x28"}', b'{"x": 1}}'])
def test_malformed_json_is_one_error(bad: bytes) -> None:
    out = feed_all([bad, b' {"ok": 1}'])
    assert len(errors(out)) == 1, out
    assert out[-1] == {"ok": 1}


def test_too_large_value_is_one_error_and_the_stream_stays_in_step() -> None:
    big = b'{"execute": "x", "arguments": {"s": "' + b"a" * 5000 + b'"}}'
    out = feed_all([big[:100], big[100:], b'{"ok": 1}'], max_size=1000)
    assert errors(out) == [f"JSON message of {len(big)} bytes is too large (at most 1000)"]
    assert out[-1] == {"ok": 1}


def test_deep_nesting_is_refused() -> None:
    out = feed_all([b"[" * 40, b"]" * 40, b'{"ok": 1}'], max_depth=32)
    assert errors(out)[0] == "JSON nesting deeper than 32"
    assert out[-1] == {"ok": 1}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_random_bytes_never_raise_and_splits_do_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = feed_all([data], max_size=200, max_depth=16)
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    split = feed_all(pieces, max_size=200, max_depth=16)
    assert [repr(x) for x in whole] == [repr(x) for x in split]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4), max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=5), st.integers(1, 7))
def test_any_json_values_round_trip(values: list[Any], step: int) -> None:
    data = b"".join(json.dumps(v).encode() + b" " for v in values)
    out = feed_all([data[i:i + step] for i in range(0, len(data), step)])
    assert out == values


# -- requests ----------------------------------------------------------------------
@pytest.mark.parametrize(("obj", "desc"), [
    ([1], "QMP input must be a JSON object"),
    ({"id": 1}, "QMP input lacks member 'execute'"),
    ({"execute": 5}, "QMP input member 'execute' must be a string"),
    ({"execute": "x", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "x", "bogus": 1}, "QMP input member 'bogus' is unexpected"),
])
def test_bad_requests(obj: Any, desc: str) -> None:
    with pytest.raises(QmpError) as err:
        parse_request(obj)
    assert err.value.desc == desc and err.value.cls.value == "GenericError"


def test_request_fields() -> None:
    req = parse_request({"execute": "stop", "id": None})
    assert req.name == "stop" and req.arguments == {} and req.id is None
    assert parse_request({"execute": "stop"}).id is NO_ID


def test_argument_checks() -> None:
    params = (Param("name", ArgType.STR), Param("n", ArgType.INT, required=False))
    check_arguments(params, {"name": "x", "n": 3})
    for args, desc in (({}, "Parameter 'name' is missing"),
                       ({"name": 1}, "Invalid parameter type for 'name', expected: string"),
                       ({"name": "x", "n": True}, "Invalid parameter type for 'n', expected: int"),
                       ({"name": "x", "z\n": 1}, "Parameter 'z?' is unexpected")):
        with pytest.raises(QmpError) as err:
            check_arguments(params, args)
        assert err.value.desc == desc


def test_encoding_is_ascii_crlf_and_events_have_timestamps() -> None:
    line = encode({"return": {"s": "é"}})
    assert line.endswith(b"\r\n") and line.isascii()
    ev = json.loads(event("STOP", None, ts=12.5))
    assert ev == {"event": "STOP", "timestamp": {"seconds": 12, "microseconds": 500000}}
    assert timestamp(float("nan")) == {"seconds": -1, "microseconds": -1}
