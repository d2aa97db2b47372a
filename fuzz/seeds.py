#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/.

Run from anywhere: `python3 fuzz/seeds.py`. Deterministic; no dependencies. The seeds are
committed (a few KB); the corpus libFuzzer grows from them (fuzz/corpus) is not.
Wire constants are those of crates/nbd/src/proto.rs.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")

# crates/nbd/src/proto.rs
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
BASE_ALLOCATION = b"base:allocation"
# Server side (for the client target).
NBDMAGIC = 0x4E42444D41474943
OLDSTYLE_MAGIC = 0x0000420281861253
OPT_REPLY_MAGIC = 0x0003E889045565A9
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_HAS_FLAGS = 1 << 0
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_SEND_CACHE = 1 << 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
EIO = 5
ENOSPC = 28

# The fuzz target serves one 1 MiB export named "disk".
EXPORT = b"disk"


def string(s):
    return struct.pack(">I", len(s)) + s


def option(opt, data=b""):
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def info_payload(name, infos):
    return string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name, queries):
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


_cookies = iter(range(0x1000, 0x10000))


def request(kind, offset=0, length=0, flags=0, cookie=None, payload=b""):
    if cookie is None:
        cookie = next(_cookies)  # distinct, so the target can match every reply
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload


def pattern(n, seed):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def nbd_sessions():
    flags = struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    transmission = b"".join(
        [
            request(CMD_WRITE, 0, 512, payload=pattern(512, 1)),
            request(CMD_WRITE, 4096 - 100, 200, CMD_FLAG_FUA, payload=pattern(200, 2)),
            request(CMD_READ, 0, 512),
            request(CMD_READ, 4000, 200, CMD_FLAG_DF),
            request(CMD_BLOCK_STATUS, 0, 65536),
            request(CMD_BLOCK_STATUS, 0, 1 << 20, CMD_FLAG_REQ_ONE),
            request(CMD_TRIM, 4096, 4096),
            request(CMD_WRITE_ZEROES, 8192, 4096, CMD_FLAG_NO_HOLE),
            request(CMD_WRITE_ZEROES, 0, 8192, CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA),
            request(CMD_CACHE, 0, 4096),
            request(CMD_FLUSH),
            request(CMD_READ, (1 << 20) - 10, 20),  # beyond the end: an error reply
            request(CMD_DISC),
        ]
    )
    yield "fixed_newstyle_structured_go", flags + b"".join(
        [
            option(OPT_STRUCTURED_REPLY),
            option(OPT_SET_META_CONTEXT, meta_payload(EXPORT, [BASE_ALLOCATION])),
            option(OPT_GO, info_payload(EXPORT, [INFO_BLOCK_SIZE, INFO_NAME])),
            transmission,
        ]
    )
    # Simple replies (no NBD_OPT_STRUCTURED_REPLY), export chosen by the empty name.
    yield "simple_replies_go_empty_name", flags + b"".join(
        [
            option(OPT_GO, info_payload(b"", [])),
            request(CMD_WRITE, 512, 512, payload=pattern(512, 3)),
            request(CMD_READ, 0, 1024),
            request(CMD_BLOCK_STATUS, 0, 4096),  # no context negotiated: an error reply
            request(CMD_FLUSH),
            request(CMD_DISC),
        ]
    )
    # Oldest negotiation: NBD_OPT_EXPORT_NAME, without NO_ZEROES (124 zero bytes follow).
    yield "export_name", struct.pack(">I", FLAG_C_FIXED_NEWSTYLE) + b"".join(
        [
            option(OPT_EXPORT_NAME, EXPORT),
            request(CMD_WRITE, 0, 64, CMD_FLAG_FUA, payload=pattern(64, 4)),
            request(CMD_READ, 0, 64),
            request(CMD_TRIM, 0, 4096),
            request(CMD_DISC),
        ]
    )
    yield "list_info_abort", flags + b"".join(
        [
            option(OPT_LIST),
            option(OPT_INFO, info_payload(EXPORT, [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])),
            option(OPT_LIST_META_CONTEXT, meta_payload(EXPORT, [])),
            option(OPT_LIST_META_CONTEXT, meta_payload(EXPORT, [b"base:"])),
            option(OPT_STARTTLS),
            option(OPT_ABORT),
        ]
    )
    # Refused options that let the session go on, then a GO.
    yield "errors_then_go", flags + b"".join(
        [
            option(OPT_SET_META_CONTEXT, meta_payload(EXPORT, [BASE_ALLOCATION])),  # before structured
            option(OPT_GO, info_payload(b"nope", [])),
            option(OPT_INFO, b"\x00\x00\x00\x09disk"),  # name length lies
            option(OPT_LIST, b"x"),
            option(99),
            option(OPT_STRUCTURED_REPLY),
            option(OPT_GO, info_payload(EXPORT, [])),
            request(CMD_WRITE, 0, 16, CMD_FLAG_DF, payload=pattern(16, 5)),  # bad flag
            request(9),  # unknown command
            request(CMD_DISC),
        ]
    )


QMP_SESSIONS = {
    "negotiate_and_commands": b"".join(
        [
            b'{"execute": "qmp_capabilities"}\r\n',
            b'{"execute": "query-commands", "id": 1}\r\n',
            b'{"execute": "query-version", "id": "v"}\r\n',
            b'{"execute": "echo", "arguments": {"a": [1, -2, 2.5, "x\\u00e9\\n", null, true]}, "id": {"n": [3]}}\r\n',
            b'{"execute": "emit", "arguments": {"k": "v"}}\r\n',
            b'{"execute": "fail", "id": 4}\r\n',
            b'{"execute": "no-such-command", "id": 5}\r\n',
            b'{"execute": "qmp_capabilities", "id": 6}\r\n',
        ]
    ),
    "before_negotiation": b"".join(
        [
            b'{"execute": "echo", "id": 1}\n',
            b'{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}\n',
            b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
            b'{"execute":"echo","arguments":{}}',
        ]
    ),
    "malformed": b"".join(
        [
            b'{"execute": nope}\n',
            b'{"execute":"qmp_capabilities"}\n',
            b"[1, 2]\n",
            b'"just a string"\n',
            b"42\n",
            b'{"id": 7}\n',
            b'{"execute": 1}\n',
            b'{"execute": "echo", "arguments": []}\n',
            b'{"execute": "echo", "foo": 1, "id": "a"}\n',
            b'{"spans":\n[1]}\n',
            b"}}garbage\n",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
            b'{"execute": "echo", "arguments": {"s": "\\ud83d\\ude00"}, "id": 1e400}\n',
            b'{"execute": "echo", "arguments": {"x": 1}',
        ]
    ),
}


def nbd_tls_sessions():
    """Client bytes for nbd_server_tls: options refused before TLS, then STARTTLS and a TLS
    ClientHello-like record (the handshake fails), or STARTTLS with injected clear options."""
    flags = struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    hello = b"\x16\x03\x01\x00\x2f\x01\x00\x00\x2b\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    go = option(OPT_GO, info_payload(b"disk", []))
    return [
        ("refused_then_abort", flags + option(OPT_LIST) + go + option(OPT_STRUCTURED_REPLY) + option(OPT_ABORT)),
        ("export_name_before_tls", flags + option(OPT_EXPORT_NAME, b"disk")),
        ("starttls_with_data", flags + option(OPT_STARTTLS, b"x") + option(OPT_ABORT)),
        ("starttls_then_hello", flags + option(OPT_LIST) + option(OPT_STARTTLS) + hello),
        ("starttls_then_clear_go", flags + option(OPT_STARTTLS) + go),
        ("starttls_then_nothing", flags + option(OPT_STARTTLS)),
    ]


def tls_record_items():
    """Items for tls_records: `mode, a, len(2), bytes`. Mode 0 seals inner type `a` with
    (mode >> 2) zeroes of padding, 1 writes raw bytes, 2 seals application data."""
    def item(mode, a, data):
        return bytes([mode, a]) + struct.pack(">H", len(data)) + data
    data = lambda n, seed: bytes((i * 7 + seed) % 256 for i in range(n))
    return [
        ("data_sizes", item(2, 0, b"") + item(2, 0, b"x") + item(2, 0, data(16384, 1)) + item(2, 0, data(300, 2))),
        ("padded_data", item(0 | 8 << 2, 23, data(100, 3)) + item(2, 0, data(10, 4))),
        ("close_notify", item(2, 0, b"abc") + item(0, 21, b"\x01\x00") + item(2, 0, b"after")),
        ("fatal_alert", item(0, 21, b"\x02\x28") + item(2, 0, b"x")),
        ("user_canceled", item(0, 21, b"\x01\x5a") + item(2, 0, b"still here")),
        ("key_update_requested", item(2, 0, b"a") + item(0, 22, b"\x18\x00\x00\x01\x01") + item(2, 0, b"b")),
        ("key_update_split", item(0, 22, b"\x18\x00") + item(0, 22, b"\x00\x01\x00")),
        ("ticket", item(0, 22, b"\x04\x00\x00\x0d" + bytes(4) + bytes(4) + b"\x00" + b"\x00\x01\x00" + b"\x00\x00")),
        ("unknown_inner_type", item(0, 99, b"zzz")),
        ("raw_plain_header", item(2, 0, b"ok") + item(1, 0, b"\x17\x03\x03\x00\x05hello")),
        ("raw_overflow", item(1, 0, b"\x17\x03\x03\x48\x01")),
        ("raw_handshake_type", item(1, 0, b"\x16\x03\x03\x00\x01\x00")),
    ]


def nbd_parser_inputs():
    yield "request_header", request(CMD_READ, 4096, 512, CMD_FLAG_DF, cookie=0x0123456789ABCDEF)
    yield "request_header_write", request(CMD_WRITE, 0, 16, CMD_FLAG_FUA, payload=pattern(16, 6))
    yield "info_payload", info_payload(EXPORT, [INFO_NAME, INFO_BLOCK_SIZE])
    yield "meta_context_payload", meta_payload(EXPORT, [BASE_ALLOCATION, b"base:"])


# --- nbd_client_replies: the server's side, for the client target ---------------------------
# Byte 0 is the target's control byte (see fuzz_targets/nbd_client_replies.rs): bits 0-1 the
# mode (0 raw; 1 structured + base:allocation id 7; 2 structured, no context; 3 simple replies),
# bit 2 hang up after the input, bit 3 block sizes 512/512/512, bit 4 read-only, bit 5 no
# WRITE_ZEROES, bit 6 no FUA, bit 7 no FLUSH/TRIM/CACHE. The client numbers its cookies from 1
# in the order it registers requests: read(0, 512), read(1024, 1024) (two requests with
# block sizes), write(512, 512, FUA), block_status(0, 65536), block_status(65536, 4096,
# REQ_ONE), flush, write_zeroes(2048, 512), discard(4096, 512), cache(0, 512); requests the
# server's flags make unnecessary take no cookie.
CLIENT_DISK = 1 << 20
META_ID = 7
ALL_FLAGS = (FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM
             | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO | FLAG_SEND_CACHE)


def opt_reply(opt, kind, data=b""):
    return struct.pack(">QIII", OPT_REPLY_MAGIC, opt, kind, len(data)) + data


def greeting(flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def go_replies(size=CLIENT_DISK, flags=ALL_FLAGS, block_sizes=None):
    out = opt_reply(OPT_GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))
    if block_sizes:
        out += opt_reply(OPT_GO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, *block_sizes))
    return out + opt_reply(OPT_GO, REP_ACK)


def full_handshake():
    """What the target's mode 1 sends: structured replies, base:allocation, GO."""
    return b"".join(
        [
            greeting(),
            opt_reply(OPT_STRUCTURED_REPLY, REP_ACK),
            opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, struct.pack(">I", META_ID) + BASE_ALLOCATION),
            opt_reply(OPT_SET_META_CONTEXT, REP_ACK),
            go_replies(),
        ]
    )


def simple(cookie, error=0, data=b""):
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie, kind, body=b"", done=True):
    flags = REPLY_FLAG_DONE if done else 0
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(body)) + body


def none(cookie):
    return chunk(cookie, REPLY_TYPE_NONE)


def data_chunk(cookie, offset, data, done=True):
    return chunk(cookie, REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data, done)


def hole_chunk(cookie, offset, length, done=True):
    return chunk(cookie, REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, length), done)


def status_chunk(cookie, extents, done=True, ctx=META_ID):
    body = struct.pack(">I", ctx) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, body, done)


def error_chunk(cookie, errno, msg=b"", offset=None, done=True):
    body = struct.pack(">IH", errno, len(msg)) + msg
    if offset is None:
        return chunk(cookie, REPLY_TYPE_ERROR, body, done)
    return chunk(cookie, REPLY_TYPE_ERROR_OFFSET, body + struct.pack(">Q", offset), done)


def structured_replies_all_features():
    """Replies for cookies 1-9 (no block sizes: the 1 KiB read is one request), out of order."""
    return b"".join(
        [
            none(3),  # write
            status_chunk(4, [(4096, 0), (8192, STATE_HOLE | STATE_ZERO), (53248, 0)], done=False),
            data_chunk(1, 0, pattern(512, 1)),
            data_chunk(2, 1024, pattern(512, 2), done=False),
            hole_chunk(2, 1536, 512, done=False),
            none(2),
            status_chunk(5, [(4096, STATE_ZERO), (4096, 0)]),  # REQ_ONE: the client keeps one
            none(4),
            none(6),  # flush
            none(7),  # write zeroes
            error_chunk(8, EIO, b"trim failed", done=False),
            none(8),
            none(9),  # cache
        ]
    )


def nbd_client_inputs():
    yield "structured_all_ok", bytes([0x01]) + structured_replies_all_features()
    yield "structured_all_ok_hang_up", bytes([0x05]) + structured_replies_all_features()
    # Block sizes 512/512/512: the 1 KiB read is cookies 2 and 3, the rest shift by one.
    yield "structured_split_read", bytes([0x09]) + b"".join(
        [
            data_chunk(3, 1536, pattern(512, 3)),
            data_chunk(2, 1024, pattern(256, 4), done=False),
            data_chunk(2, 1280, pattern(256, 5)),
            hole_chunk(1, 0, 512),
            none(4),
            status_chunk(5, [(65536, 0)]),
            status_chunk(6, [(512, STATE_HOLE)]),
            none(7),
            error_chunk(8, ENOSPC, b"", offset=2048),
            simple(9),
            none(10),
        ]
    )
    # Simple replies only (no status requests without a context): cookies 1-7.
    yield "simple_replies", bytes([0x03]) + b"".join(
        [
            simple(2, 0, pattern(1024, 6)),
            simple(1, 0, pattern(512, 7)),
            simple(3),
            simple(4),
            simple(5, ENOSPC),
            simple(6),
            simple(7),
        ]
    )
    # Structured replies, no context (no status requests): cookies 1-7; hang up at the end.
    yield "structured_no_context", bytes([0x06]) + b"".join(
        [
            error_chunk(1, EIO, b"bad sector", offset=100, done=False),
            data_chunk(1, 0, pattern(512, 8)),
            data_chunk(2, 1024, pattern(1024, 9)),
            simple(3),
            simple(4),
            none(5),
            none(6),
            none(7),
        ]
    )
    # No WRITE_ZEROES, FUA, FLUSH, TRIM or CACHE: read 1, read 2, write 3 (no FUA, no flush),
    # status 4 and 5, zeroes written as data 6.
    yield "few_features", bytes([0xE1]) + b"".join(
        [
            data_chunk(1, 0, pattern(512, 10)),
            hole_chunk(2, 1024, 1024),
            none(3),
            status_chunk(4, [(65536, STATE_HOLE | STATE_ZERO)]),
            status_chunk(5, [(4096, 0)]),
            none(6),
        ]
    )
    # Read-only export: reads 1, 2, status 3, 4, flush 5, cache 6; the writes fail locally.
    yield "read_only", bytes([0x15]) + b"".join(
        [
            data_chunk(1, 0, pattern(512, 11)),
            data_chunk(2, 1024, pattern(1024, 12)),
            status_chunk(3, [(65536, 0)]),
            status_chunk(4, [(4096, 0)]),
            none(5),  # flush
            none(6),  # cache
        ]
    )
    # A protocol violation after a good reply: the connection dies, the rest fail.
    yield "violation_bad_magic", bytes([0x01]) + data_chunk(1, 0, pattern(512, 13)) + b"\xde\xad\xbe\xef" * 8
    yield "violation_unknown_cookie", bytes([0x01]) + none(3) + none(77)
    # Raw mode: the whole handshake in the input (replies sent at once), then the same replies.
    yield "raw_full_handshake", bytes([0x04]) + full_handshake() + structured_replies_all_features()
    # Raw: GO unsupported, NBD_OPT_EXPORT_NAME (without NO_ZEROES: 124 zero bytes), simple replies.
    yield "raw_export_name", bytes([0x04]) + b"".join(
        [
            greeting(FLAG_FIXED_NEWSTYLE),
            opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP),
            opt_reply(OPT_GO, REP_ERR_UNSUP),
            struct.pack(">QH", CLIENT_DISK, ALL_FLAGS),
            bytes(124),
            simple(1, 0, pattern(512, 14)),
            simple(2, 0, pattern(1024, 15)),
            simple(3),
            simple(4),
            simple(5),
            simple(6, EIO),
            simple(7),
        ]
    )
    # Raw: not fixed newstyle (only NBD_OPT_EXPORT_NAME), NO_ZEROES, read-only flags.
    yield "raw_unfixed_newstyle", bytes([0x04]) + greeting(FLAG_NO_ZEROES) + struct.pack(
        ">QH", CLIENT_DISK, FLAG_HAS_FLAGS | 2
    ) + simple(2, 0, pattern(1024, 17)) + simple(1, 0, pattern(512, 16))
    # Raw: GO refused, and an oldstyle server.
    yield "raw_go_refused", bytes([0x04]) + greeting() + opt_reply(OPT_STRUCTURED_REPLY, REP_ACK) + opt_reply(
        OPT_SET_META_CONTEXT, REP_ACK
    ) + opt_reply(OPT_GO, REP_ERR_UNSUP + 5, b"no such export")
    yield "raw_oldstyle", bytes([0x04]) + struct.pack(">QQQH", NBDMAGIC, OLDSTYLE_MAGIC, CLIENT_DISK, 0) + bytes(124)


URIS = [
    b"nbd://example.com/disk",
    b"nbd://example.com:10810//abs/path",
    b"nbd://10.0.0.1:1234/hello%20world",
    b"nbd://[::1]:99/x",
    b"nbd://[fe80::1%25eth0]/",
    b"NBD://h:/e",
    b"nbd:///e",
    b"nbd+unix:///disk?socket=/tmp/s.sock",
    b"nbd+unix://?socket=rel.sock",
    b"nbd+unix:///a%2Fb?socket=/tmp/with%20space&",
    b"nbds://h/e",
    b"nbd+vsock://1/e",
    b"nbd://h/e?tls-type=x509",
    b"nbd://user@h/e#frag",
    b"nbd://h/%C3%A9t%C3%A9",
    b"nbd://h:65535/%zz",
    b"tcp:127.0.0.1:10809",
    b"tcp:[::1]:99",
    b"unix:/run/coloblk.sock",
]


# cli_specs: disk specifications (one per line) and a --config file.
CLI_SEEDS = {
    "spec": b"d0=/img/a.qcow2,format=qcow2,readonly,replica=nbd://h/x",
    "specs": b"vm0=/var/lib/a.raw,direct,replica=nbd+unix:///vm0?socket=/run/s.sock\nbad,=x\n",
    "config": b'export-listen = "unix:/run/p.sock"\nmode = "async"\nstart = true\n'
    b'disk = ["a=/a.raw,replica=nbd://h/a", "b=/b.qcow2,format=qcow2"]\nio-threads = 8\n',
}


# qcow2_header: small valid images (docs/interop/qcow2.txt in QEMU), every table in its own
# cluster right after the header: refcount table, one refcount block, L1 table, and with data
# one L2 table and one data cluster. With 512-byte clusters the whole file is at most 3 KiB.
QCOW2_COPIED = 1 << 63


def qcow2_image(cluster_bits=9, version=3, refcount_order=4, size=1 << 20, data=False,
                reftable_offset=None):
    cs = 1 << cluster_bits
    l2_entries = cs // 8
    l1_size = -(-size // (cs * l2_entries))
    assert l1_size * 8 <= cs, "the L1 table must fit in one cluster"
    clusters = 6 if data else 4
    img = bytearray(clusters * cs)
    reftable, refblock, l1 = cs, 2 * cs, 3 * cs
    header = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, 0, 0, cluster_bits, size,
                         0, l1_size, l1, reftable if reftable_offset is None else reftable_offset,
                         1, 0, 0)
    if version == 3:
        header += struct.pack(">QQQII", 0, 0, 0, refcount_order, 104)
    img[:len(header)] = header
    img[reftable:reftable + 8] = struct.pack(">Q", refblock)
    bits = 1 << refcount_order
    for c in range(clusters):
        if bits < 8:
            img[refblock + c * bits // 8] |= 1 << (c * bits % 8)
        else:
            end = refblock + (c + 1) * bits // 8
            img[end - 1] = 1
    if data:
        l2, dc = 4 * cs, 5 * cs
        img[l1:l1 + 8] = struct.pack(">Q", l2 | QCOW2_COPIED)
        img[l2:l2 + 8] = struct.pack(">Q", dc | QCOW2_COPIED)
        img[dc:dc + cs] = pattern(cs, 9)
    return bytes(img)


QCOW2_SEEDS = {
    "v3_512": qcow2_image(),
    "v3_512_data": qcow2_image(data=True),
    "v2_512_data": qcow2_image(version=2, data=True),
    "v3_512_refcount1": qcow2_image(refcount_order=0, data=True),
    "v3_512_refcount4": qcow2_image(refcount_order=2),
    "v3_512_refcount64": qcow2_image(refcount_order=6, data=True),
    "v3_512_full_l1": qcow2_image(size=2 << 20, data=True),
    "v3_4k_1g": qcow2_image(cluster_bits=12, size=1 << 30),
    # The image that aborted imago with a stack overflow on the first allocating write: the
    # refcount table lies past the end of the file. Our open refuses it.
    "v3_512_reftable_past_eof": qcow2_image(reftable_offset=1 << 20),
}


# vhost_blk_request: byte 0 the device (bit 0 read-only, bit 1 4 KiB), byte 1 the number of
# descriptors, 10 bytes each (addr u32, len u32, flags u16; 2 = device-writable), then guest
# memory from address 0 (the header at 0, ranges at 0x10).
def vhost_chain(mode, descs, memory):
    out = bytes([mode, len(descs)])
    for addr, length, flags in descs:
        out += struct.pack("<IIH", addr, length, flags)
    return out + memory


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


VHOST_SEEDS = {
    "read": vhost_chain(0, [(0, 16, 0), (0x1000, 4096, 2), (0x3000, 1, 2)], blk_header(0, 8)),
    "write": vhost_chain(0, [(0, 16, 0), (0x1000, 1024, 0), (0x3000, 1, 2)], blk_header(1, 0)),
    "flush": vhost_chain(0, [(0, 16, 0), (0x3000, 1, 2)], blk_header(4, 0)),
    "get_id": vhost_chain(0, [(0, 16, 0), (0x1000, 20, 2), (0x3000, 1, 2)], blk_header(8, 0)),
    "write_zeroes": vhost_chain(0, [(0, 16, 0), (0x10, 16, 0), (0x3000, 1, 2)],
                                blk_header(13, 0) + struct.pack("<QII", 4, 8, 1)),
    "discard_ro": vhost_chain(1, [(0, 16, 0), (0x10, 16, 0), (0x3000, 1, 2)],
                              blk_header(11, 0) + struct.pack("<QII", 0, 8, 0)),
    "read_past_end": vhost_chain(2, [(0, 16, 0), (0x1000, 4096, 2), (0x3000, 1, 2)],
                                 blk_header(0, 4)),
}


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    for name, data in nbd_sessions():
        write("nbd_server_session", name, data)
    for name, data in QMP_SESSIONS.items():
        write("qmp_session", name, data)
        # qmp_framer: the first byte picks the cuts (bit 7: after newlines; else pseudo-random).
        write("qmp_framer", name + "_lines", b"\x80" + data)
        write("qmp_framer", name + "_random", b"\x05" + data)
    for name, data in nbd_tls_sessions():
        write("nbd_server_tls", name, data)
    for name, data in nbd_parser_inputs():
        write("nbd_parsers", name, data)
    for name, data in tls_record_items():
        write("tls_records", name, data)
    for name, data in nbd_client_inputs():
        write("nbd_client_replies", name, data)
    for i, uri in enumerate(URIS):
        write("nbd_uri", "uri_%02d" % i, uri)
    for name, data in CLI_SEEDS.items():
        write("cli_specs", name, data)
    for name, data in QCOW2_SEEDS.items():
        write("qcow2_header", name, data)
    for name, data in VHOST_SEEDS.items():
        write("vhost_blk_request", name, data)


if __name__ == "__main__":
    main()
