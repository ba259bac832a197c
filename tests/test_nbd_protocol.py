"""The NBD wire codecs on their own: what a client sends is parsed or refused
with OptionError/ProtocolError, never anything else, whatever the bytes."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.nbd import protocol as p

EXAMPLES = 2000 if os.environ.get("KVMPY_FUZZ") else 200

names = st.binary(max_size=64)


@settings(max_examples=EXAMPLES)
@given(name=names, kinds=st.lists(st.integers(0, 0xFFFF), max_size=20))
def test_info_request_round_trip(name, kinds):
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(kinds)) + b"".join(
        struct.pack(">H", k) for k in kinds)
    assert p.parse_info_request(data) == p.InfoRequest(name, tuple(kinds))
    # Any byte more or less is a bad option, not a misread one.
    for bad in (data + b"\0", data[:-1]):
        with pytest.raises(p.OptionError):
            p.parse_info_request(bad)


@settings(max_examples=EXAMPLES)
@given(name=names, queries=st.lists(st.binary(max_size=40), max_size=10))
def test_meta_context_request_round_trip(name, queries):
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)
    assert p.parse_meta_context_request(data) == p.MetaContextRequest(name, tuple(queries))


@settings(max_examples=EXAMPLES)
@given(data=st.binary(max_size=200))
def test_option_parsers_take_any_bytes(data):
    for parse in (p.parse_info_request, p.parse_meta_context_request):
        try:
            parse(data)
        except p.OptionError as e:
            assert e.reply & (1 << 31)


def test_oversized_strings_and_query_counts_are_refused():
    with pytest.raises(p.OptionError) as e:
        p.parse_info_request(struct.pack(">I", p.MAX_STRING + 1) + bytes(p.MAX_STRING + 3))
    assert e.value.reply == p.REP_ERR_TOO_BIG
    with pytest.raises(p.OptionError) as e:
        p.parse_meta_context_request(struct.pack(">II", 0, 0xFFFFFFFF))
    assert e.value.reply == p.REP_ERR_TOO_BIG


@settings(max_examples=EXAMPLES)
@given(data=st.binary(min_size=p.REQUEST_SIZE, max_size=p.REQUEST_SIZE))
def test_request_parser(data):
    magic = struct.unpack(">I", data[:4])[0]
    if magic != p.REQUEST_MAGIC:
        with pytest.raises(p.ProtocolError):
            p.parse_request(data)
    else:
        req = p.parse_request(data)
        assert req.length == struct.unpack(">I", data[-4:])[0]


def test_replies_have_the_spec_layout():
    assert p.server_hello() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert p.simple_reply(22, 7) == struct.pack(">IIQ", 0x67446698, 22, 7)
    chunk = p.offset_hole(p.REPLY_FLAG_DONE, 9, 4096, 512)
    assert chunk == struct.pack(">IHHQIQI", 0x668E33EF, 1, 2, 9, 12, 4096, 512)
    err = p.error_chunk(3, p.EIO, "bad", offset=8)
    assert err == struct.pack(">IHHQI", 0x668E33EF, 1, 0x8002, 3, 4 + 2 + 3 + 8) + \
        struct.pack(">IH", 5, 3) + b"bad" + struct.pack(">Q", 8)
    assert p.export_old_style(1 << 20, 3, no_zeroes=False) == struct.pack(">QH", 1 << 20, 3) + bytes(124)
    assert len(p.export_old_style(1 << 20, 3, no_zeroes=True)) == 10
