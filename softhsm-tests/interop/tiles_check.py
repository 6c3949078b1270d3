"""An independent C2SP tlog-tiles client for lavd's interop tests, written
from the C2SP specifications (signed-note, tlog-checkpoint, tlog-tiles) and
RFC 6962, not from lavd's code. Standard library and `cryptography`
(Ed25519) only.

  tiles_check.py DIR VKEY    DIR mirrors a log as tlog-tiles serves it
                             (`checkpoint`, `tile/<L>/<N>[.p/<W>]`,
                             `tile/entries/<N>[.p/<W>]`); VKEY is the
                             log's signed-note verifier key
                             (`name+hexkeyid+base64(0x01 || key)`).

It verifies the checkpoint's signature under VKEY; reads every level-0
tile and entry bundle the checkpoint's size needs; checks that each entry
hashes (SHA-256 of 0x00 || entry) to its level-0 hash and that each full
level-0 tile hashes to its level-1 hash; computes the RFC 6962 root of the
leaf hashes; and prints `verified SIZE ROOT` (ROOT in standard base64) when
it equals the checkpoint's. Anything else exits 1 naming what failed.
"""

import base64
import hashlib
import os
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TILE = 256


def fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(1)


def verifier(vkey: str):
    """signed-note: name+hexkeyid+base64(type || key); Ed25519 is type 0x01
    and the key ID is the first 4 bytes of SHA-256(name || 0x0A || type ||
    key)."""
    # The name holds no "+"; the base64 key may.
    name, key_id, encoded = vkey.split("+", 2)
    key = base64.b64decode(encoded, validate=True)
    if len(key) != 33 or key[0] != 0x01:
        fail("VKEY: not an Ed25519 verifier key")
    computed = hashlib.sha256(name.encode() + b"\n" + key).digest()[:4]
    if computed.hex() != key_id:
        fail("VKEY: the key ID does not match the name and key")
    return name, computed, Ed25519PublicKey.from_public_bytes(key[1:])


def checkpoint(text: str, vkey: str):
    """The checkpoint's (size, root) once a signature line of VKEY verifies
    over the note text (every line up to the blank one, with its newline)."""
    name, key_id, public = verifier(vkey)
    # signed-note: UTF-8, no control character but newline, every line
    # (the last signature line included) ended by a newline.
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        fail("checkpoint: a control character other than a newline")
    if not text.endswith("\n"):
        fail("checkpoint: the last line has no newline")
    body, blank, signatures = text.partition("\n\n")
    if not blank:
        fail("checkpoint: no blank line before the signatures")
    body += "\n"
    verified = False
    for line in signatures[:-1].split("\n"):
        if not line.startswith("\u2014 "):
            fail(f"checkpoint: not a signature line: {line!r}")
        signer, _, encoded = line[2:].rpartition(" ")
        signature = base64.b64decode(encoded, validate=True)
        if signer == name and signature[:4] == key_id:
            try:
                public.verify(signature[4:], body.encode())
            except InvalidSignature:
                fail("checkpoint: the signature does not verify")
            verified = True
    if not verified:
        fail("checkpoint: no signature by VKEY")
    lines = body.split("\n")
    if len(lines) < 4 or not lines[1].isdigit() or str(int(lines[1])) != lines[1]:
        fail("checkpoint: not origin, size and root lines")
    # tlog-checkpoint: the key name SHOULD be the origin; lavd's is.
    if lines[0] != name:
        fail(f"checkpoint: origin {lines[0]!r} is not the key's name {name!r}")
    root = base64.b64decode(lines[2], validate=True)
    if len(root) != 32:
        fail("checkpoint: the root is not 32 bytes")
    return int(lines[1]), root


def path(kind: str, index: int, width: int) -> str:
    """tlog-tiles: the index in zero-padded 3-digit elements, all but the
    last prefixed with x; a partial tile adds .p/<width>."""
    digits = str(index)
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    encoded = "/".join(["x" + g for g in groups[:-1]] + groups[-1:])
    suffix = f".p/{width}" if width < TILE else ""
    return f"tile/{kind}/{encoded}{suffix}"


def read(directory: str, name: str) -> bytes:
    try:
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()
    except OSError as e:
        fail(f"{name}: {e}")


def mth(hashes):
    """RFC 6962 §2.1: the Merkle tree hash of leaf hashes."""
    if len(hashes) == 1:
        return hashes[0]
    split = 1
    while split * 2 < len(hashes):
        split *= 2
    left, right = mth(hashes[:split]), mth(hashes[split:])
    return hashlib.sha256(b"\x01" + left + right).digest()


def main() -> int:
    directory, vkey = sys.argv[1], sys.argv[2]
    size, root = checkpoint(read(directory, "checkpoint").decode("utf-8"), vkey)
    if size == 0:
        fail("checkpoint: an empty log")
    leaves = []
    full_tiles = []
    for index in range((size + TILE - 1) // TILE):
        width = min(TILE, size - index * TILE)
        name = path("0", index, width)
        tile = read(directory, name)
        if len(tile) != 32 * width:
            fail(f"{name}: {len(tile)} bytes, not {width} hashes")
        hashes = [tile[i : i + 32] for i in range(0, len(tile), 32)]
        bundle_name = path("entries", index, width)
        bundle = read(directory, bundle_name)
        at = 0
        for i in range(width):
            if at + 2 > len(bundle):
                fail(f"{bundle_name}: ends before entry {i}")
            length = int.from_bytes(bundle[at : at + 2], "big")
            entry = bundle[at + 2 : at + 2 + length]
            if len(entry) != length:
                fail(f"{bundle_name}: entry {i} is cut short")
            at += 2 + length
            if hashlib.sha256(b"\x00" + entry).digest() != hashes[i]:
                fail(f"{name}: hash {i} is not the hash of {bundle_name}'s entry {i}")
        if at != len(bundle):
            fail(f"{bundle_name}: bytes after entry {width - 1}")
        if width == TILE:
            full_tiles.append(mth(hashes))
        leaves.extend(hashes)
    if full_tiles:
        count = len(full_tiles)
        level1 = b"".join(
            read(directory, path("1", index, min(TILE, count - index * TILE)))
            for index in range((count + TILE - 1) // TILE)
        )
        if level1 != b"".join(full_tiles):
            fail("tile/1: not the hashes of the full level-0 tiles")
    computed = mth(leaves)
    if computed != root:
        fail("the root of the tiles is not the checkpoint's")
    print(f"verified {size} {base64.b64encode(root).decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
