#!/usr/bin/env python3
"""A minimal, independent C2SP transparency-log witness, for interop tests.

Written from the specification texts alone, apart from lavd's Rust code, so
that lavd's witness, its verifier and this one cannot share a
misunderstanding:

- C2SP signed-note (notes, signature lines, verifier keys, key IDs),
- C2SP tlog-checkpoint (the note body: origin, size, root hash),
- C2SP tlog-cosignature (Ed25519 cosignature/v1 lines and signed message),
- C2SP tlog-witness (the add-checkpoint request and its answers),
- RFC 9162 section 2.1.4.2 (verifying a consistency proof, the same
  algorithm as RFC 6962 section 2.1.2 proofs).

Ed25519 is the `cryptography` package's. State is a JSON file, replaced
atomically (write, fsync, rename). It serves plain HTTP on loopback.

Commands:
  serve --name N --seed-file F --state S --log ORIGIN=VKEY [--log ...] [--port P]
      prints "vkey <witness vkey>" and "listening <port>", then serves.
  verify --vkey V          reads a note on stdin; prints the timestamps of the
                           cosignatures by V as JSON; exit 1 if one is bad or
                           there is none.
  spec-example             byte-level checks against the spec's example;
                           exit 0 when they hold.
"""

import argparse
import base64
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

EM_DASH = "\u2014"
SIG_TYPE_ED25519 = 0x01  # signed-note: Ed25519 note signatures
SIG_TYPE_COSIGNATURE_V1 = 0x04  # tlog-cosignature: Ed25519 cosignature/v1
MAX_PROOF_LINES = 63  # tlog-witness: "MUST NOT send more than 63"


class Refusal(Exception):
    """An add-checkpoint answer other than 200: status, content type, body."""

    def __init__(self, status, body, content_type="text/plain; charset=utf-8"):
        super().__init__(body)
        self.status = status
        self.body = body
        self.content_type = content_type


# --- signed-note -----------------------------------------------------------


def key_id(name, sig_type, public):
    """signed-note: SHA-256(name || 0x0A || type || public key)[:4]."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public)
    return digest.digest()[:4]


def parse_vkey(text, want_type):
    """`<name>+<hex key ID>+<base64(type || key)>`, checked for `want_type`."""
    # A key name has no `+`; the base64 may.
    parts = text.split("+", 2)
    if len(parts) != 3 or len(parts[1]) != 8:
        raise ValueError("a vkey is `<name>+<8 hex digits>+<base64>`")
    name, hex_id, b64 = parts
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 33 or raw[0] != want_type:
        raise ValueError(f"not a type {want_type:#04x} Ed25519 vkey")
    public = raw[1:]
    if key_id(name, want_type, public).hex() != hex_id:
        raise ValueError("the key ID does not match the key")
    return name, bytes.fromhex(hex_id), public


def format_vkey(name, sig_type, public):
    raw = bytes([sig_type]) + public
    return f"{name}+{key_id(name, sig_type, public).hex()}+{base64.b64encode(raw).decode()}"


def split_note(note):
    """Returns (body, [(name, signature bytes)]); raises ValueError."""
    if not note.endswith("\n"):
        raise ValueError("a note ends with a newline")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise ValueError("a note has an empty line before its signatures")
    body, tail = note[: cut + 1], note[cut + 2 :]
    signatures = []
    for line in tail.split("\n")[:-1]:
        if not line.startswith(EM_DASH + " "):
            raise ValueError("a signature line starts with an em dash and a space")
        name, sep, b64 = line[2:].partition(" ")
        if not sep or not name or " " in b64:
            raise ValueError("a signature line is `— <name> <base64>`")
        signatures.append((name, base64.b64decode(b64, validate=True)))
    if not signatures:
        raise ValueError("a note has at least one signature")
    return body, signatures


def parse_checkpoint_body(body):
    """tlog-checkpoint: origin, decimal size, base64 root, extension lines."""
    lines = body.split("\n")[:-1]
    if len(lines) < 3:
        raise ValueError("a checkpoint has origin, size and root lines")
    origin, size_text, root_b64 = lines[0], lines[1], lines[2]
    if not origin:
        raise ValueError("empty origin")
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise ValueError("the size is decimal without leading zeroes")
    root = base64.b64decode(root_b64, validate=True)
    if len(root) != 32:
        raise ValueError("the root hash is 32 bytes")
    return origin, int(size_text), root


def ed25519_ok(public, signature, message):
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except InvalidSignature:
        return False


# --- RFC 9162 consistency proofs ---------------------------------------------


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def consistency_ok(first, second, first_hash, second_hash, proof):
    """RFC 9162 section 2.1.4.2, step by step."""
    if first > second:
        return False
    if first == second:
        return not proof and first_hash == second_hash
    if first == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two
        path.insert(0, first_hash)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node(c, fr)
            sr = node(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_hash and sr == second_hash


# --- tlog-cosignature ---------------------------------------------------------


def cosigned_message(body, timestamp):
    return f"cosignature/v1\ntime {timestamp}\n".encode() + body.encode()


def cosignature_line(name, private, body, timestamp):
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    signature = private.sign(cosigned_message(body, timestamp))
    blob = key_id(name, SIG_TYPE_COSIGNATURE_V1, public) + timestamp.to_bytes(8, "big") + signature
    return f"{EM_DASH} {name} {base64.b64encode(blob).decode()}\n"


def cosignature_times(note, vkey):
    """Timestamps of the valid cosignatures by `vkey` in `note`; a line by it
    that does not verify raises ValueError."""
    name, kid, public = parse_vkey(vkey, SIG_TYPE_COSIGNATURE_V1)
    body, signatures = split_note(note)
    times = []
    for sig_name, blob in signatures:
        if sig_name != name or blob[:4] != kid:
            continue  # another key's line: ignored, as signed-note requires
        if len(blob) != 4 + 8 + 64:
            raise ValueError("a cosignature/v1 line holds 76 bytes")
        timestamp = int.from_bytes(blob[4:12], "big")
        if not ed25519_ok(public, blob[12:], cosigned_message(body, timestamp)):
            raise ValueError(f"the cosignature of {name} does not verify")
        times.append(timestamp)
    return times


# --- tlog-witness ---------------------------------------------------------------


def parse_request(raw):
    """Returns (old size, [proof hashes], checkpoint note); raises Refusal 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "the body is not UTF-8\n")
    head, sep, checkpoint = text.partition("\n\n")
    if not sep:
        raise Refusal(400, "no empty line before the checkpoint\n")
    lines = head.split("\n")
    first = lines[0]
    if not first.startswith("old "):
        raise Refusal(400, "the first line is `old <size>`\n")
    digits = first[4:]
    if not digits.isdigit() or (digits != "0" and digits.startswith("0")):
        raise Refusal(400, "the old size is decimal without leading zeroes\n")
    proof = []
    for line in lines[1:]:
        try:
            h = base64.b64decode(line, validate=True)
        except ValueError:
            raise Refusal(400, "a proof line is not base64\n")
        if len(h) != 32:
            raise Refusal(400, "a proof line is not a 32-byte hash\n")
        proof.append(h)
    if len(proof) > MAX_PROOF_LINES:
        raise Refusal(400, "more than 63 proof lines\n")
    return int(digits), proof, checkpoint


class Witness:
    def __init__(self, name, private, state_path, logs):
        self.name = name
        self.private = private
        self.state_path = state_path
        self.logs = logs  # origin -> [(key name, key ID, public key)]
        self.lock = threading.Lock()
        self.state = {}
        if os.path.exists(state_path):
            with open(state_path) as f:
                self.state = json.load(f)

    def save(self, state):
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        directory = os.open(os.path.dirname(os.path.abspath(self.state_path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def add_checkpoint(self, raw):
        """Returns the cosignature line, or raises Refusal."""
        old, proof, note = parse_request(raw)
        origin = note.split("\n", 1)[0]
        keys = self.logs.get(origin)
        if not keys:
            raise Refusal(404, "unknown origin\n")
        try:
            body, signatures = split_note(note)
            note_origin, size, root = parse_checkpoint_body(body)
        except ValueError as e:
            raise Refusal(400, f"{e}\n")
        # tlog-witness: 403 when no trusted key's signature verifies, and
        # also when a line of a trusted key (its name and key ID) does not
        # verify, even if another trusted key's does (signed-note calls such
        # a note malformed).
        verdicts = [
            len(blob) == 68 and ed25519_ok(public, blob[4:], body.encode())
            for sig_name, blob in signatures
            for key_name, kid, public in keys
            if sig_name == key_name and blob[:4] == kid
        ]
        if not verdicts or not all(verdicts):
            raise Refusal(403, "no trusted signature verifies, or one fails\n")
        if old > size:
            raise Refusal(400, "old size above the checkpoint size\n")
        if size == 0 and root != hashlib.sha256(b"").digest():
            # A tree of size 0 has one root (RFC 6962 MTH({})).
            raise Refusal(422, "a tree of size 0 with another root\n")
        # The check and the update happen under one lock, so two requests
        # can never roll the recorded size back.
        with self.lock:
            record = self.state.get(origin, {"size": 0, "root": None})
            if old != record["size"]:
                raise Refusal(409, f"{record['size']}\n", "text/x.tlog.size")
            recorded_root = base64.b64decode(record["root"]) if record["root"] else None
            if old == size and old != 0 and recorded_root != root:
                # tlog-witness (since C2SP 95978ca, 2026-07-06): 422.
                raise Refusal(422, "the same size with another root\n")
            if old == 0:
                if proof:
                    raise Refusal(422, "the proof from size 0 is empty\n")
            elif not consistency_ok(old, size, recorded_root, root, proof):
                raise Refusal(422, "the consistency proof does not verify\n")
            state = dict(self.state)
            state[origin] = {"size": size, "root": base64.b64encode(root).decode()}
            self.save(state)
            self.state = state
        return cosignature_line(self.name, self.private, body, int(time.time()))


def make_handler(witness):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, content_type, body):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length) if length <= 1 << 16 else b""
            if self.path != "/add-checkpoint":
                return self.answer(404, "text/plain", "no such path\n")
            if length > 1 << 16:
                return self.answer(413, "text/plain", "too large\n")
            try:
                line = witness.add_checkpoint(raw)
            except Refusal as r:
                return self.answer(r.status, r.content_type, r.body)
            self.answer(200, "text/plain; charset=utf-8", line)

        def do_GET(self):
            self.answer(405, "text/plain", "POST only\n")

        def log_message(self, *args):
            pass

    return Handler


def serve(args):
    with open(args.seed_file) as f:
        private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(f.read().strip()))
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    logs = {}
    for spec in args.log:
        origin, _, vkey = spec.partition("=")
        logs.setdefault(origin, []).append(parse_vkey(vkey, SIG_TYPE_ED25519))
    witness = Witness(args.name, private, args.state, logs)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(witness))
    print("vkey", format_vkey(args.name, SIG_TYPE_COSIGNATURE_V1, public), flush=True)
    print("listening", server.server_address[1], flush=True)
    server.serve_forever()


def verify(args):
    note = sys.stdin.read()
    try:
        times = cosignature_times(note, args.vkey)
    except ValueError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    print(json.dumps(times))
    return 0 if times else 1


def spec_example(_args):
    """The example of C2SP tlog-cosignature, byte for byte."""
    body = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    line = (
        EM_DASH
        + " witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
    )
    assert cosigned_message(body, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n"
        b"20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    _, signatures = split_note(body + "\n" + line)
    (name, blob), = signatures
    assert name == "witness.example.com/w1"
    assert len(blob) == 4 + 8 + 64
    assert int.from_bytes(blob[4:12], "big") == 1679315147
    # Our own line for the example body: same layout, the time big-endian
    # after the key ID, and it verifies.
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    ours = cosignature_line(name, private, body, 1679315147)
    vkey = format_vkey(name, SIG_TYPE_COSIGNATURE_V1, public)
    assert cosignature_times(body + "\n" + ours, vkey) == [1679315147]
    ours_blob = base64.b64decode(ours.split(" ")[2])
    assert ours_blob[4:12] == blob[4:12]
    print("ok")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--seed-file", required=True)
    s.add_argument("--state", required=True)
    s.add_argument("--log", action="append", required=True)
    s.add_argument("--port", type=int, default=0)
    v = sub.add_parser("verify")
    v.add_argument("--vkey", required=True)
    sub.add_parser("spec-example")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
        return 0
    if args.command == "verify":
        return verify(args)
    return spec_example(args)


if __name__ == "__main__":
    sys.exit(main())
