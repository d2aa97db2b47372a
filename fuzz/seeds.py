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


def nbd_parser_inputs():
    yield "request_header", request(CMD_READ, 4096, 512, CMD_FLAG_DF, cookie=0x0123456789ABCDEF)
    yield "request_header_write", request(CMD_WRITE, 0, 16, CMD_FLAG_FUA, payload=pattern(16, 6))
    yield "info_payload", info_payload(EXPORT, [INFO_NAME, INFO_BLOCK_SIZE])
    yield "meta_context_payload", meta_payload(EXPORT, [BASE_ALLOCATION, b"base:"])


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
    for name, data in nbd_parser_inputs():
        write("nbd_parsers", name, data)


if __name__ == "__main__":
    main()
