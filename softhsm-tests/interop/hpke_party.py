"""An independent HPKE party for lavd's interop tests: a provider that seals
envelopes and an agency that opens unwrap replies, with pyhpke (on
cryptography), written from PROTOCOL.md §3 and §5 and RFC 9180, not from
lavd's code.

  seal JWKS KID HEADER DEK_HEX    prints an envelope (PROTOCOL §3) sealed to
                                  the key KID of the JWK Set in file JWKS,
                                  with the header bytes of file HEADER
  recipient DIR                   makes a P-256 key in DIR/recipient.pem and
                                  prints its public JWK (kty, crv, x, y)
  open DIR REQUEST REPLY          opens the unwrap reply in file REPLY to the
                                  request in file REQUEST with DIR's key,
                                  after checking that `sealed_to.kid` is its
                                  RFC 7638 thumbprint; prints one line per
                                  result: `ok <hex DEK>` or `denied <reason>`

Any failure exits non-zero with the reason on stderr.
"""

import base64
import hashlib
import json
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

# PROTOCOL §3: suite 16-1-2.
SUITE = CipherSuite.new(
    KEMId.DHKEM_P256_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM
)
ENVELOPE_INFO = b"lav-envelope-v1\x00"
RESULT_INFO = b"lav-result-v1"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal(jwks_file, kid, header_file, dek_hex):
    with open(jwks_file) as f:
        keys = [k for k in json.load(f)["keys"] if k.get("kid") == kid]
    if len(keys) != 1:
        sys.exit(f"{kid}: {len(keys)} keys with that kid in the set")
    jwk = {m: keys[0][m] for m in ("kty", "crv", "x", "y")}
    with open(header_file, "rb") as f:
        header = f.read()
    enc, sender = SUITE.create_sender_context(
        KEMKey.from_jwk(jwk), info=ENVELOPE_INFO + header
    )
    ct = sender.seal(bytes.fromhex(dek_hex), aad=b"")
    print(
        json.dumps(
            {"v": 1, "header": b64url(header), "enc": b64url(enc), "ct": b64url(ct)}
        )
    )


def recipient(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    with open(f"{directory}/recipient.pem", "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    numbers = key.public_key().public_numbers()
    print(
        json.dumps(
            {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url(numbers.x.to_bytes(32, "big")),
                "y": b64url(numbers.y.to_bytes(32, "big")),
            }
        )
    )


def open_reply(directory, request_file, reply_file):
    with open(f"{directory}/recipient.pem", "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(request_file) as f:
        envelopes = json.load(f)["envelopes"]
    with open(reply_file) as f:
        reply = json.load(f)
    # `sealed_to.kid`: the recipient key's RFC 7638 thumbprint, the
    # required members in lexicographic order, no whitespace.
    numbers = key.public_key().public_numbers()
    members = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % (
        b64url(numbers.x.to_bytes(32, "big")),
        b64url(numbers.y.to_bytes(32, "big")),
    )
    thumbprint = b64url(hashlib.sha256(members.encode()).digest())
    if reply["sealed_to"]["kid"] != thumbprint:
        sys.exit(f"sealed_to.kid {reply['sealed_to']['kid']} is not {thumbprint}")
    results = reply["results"]
    if len(results) != len(envelopes):
        sys.exit(f"{len(results)} results for {len(envelopes)} envelopes")
    context = SUITE.create_recipient_context(
        unb64url(reply["sealed_to"]["enc"]),
        KEMKey.from_pyca_cryptography_key(key),
        info=RESULT_INFO,
    )
    # The i-th `ok` result is the i-th Seal of the one context, with the
    # envelope's header bytes as aad.
    for envelope, result in zip(envelopes, results):
        if result["status"] == "ok":
            dek = context.open(unb64url(result["ct"]), aad=unb64url(envelope["header"]))
            print(f"ok {dek.hex()}")
        else:
            print(f"denied {result['reason']}")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "seal" and len(args) == 4:
        seal(*args)
    elif command == "recipient" and len(args) == 1:
        recipient(*args)
    elif command == "open" and len(args) == 3:
        open_reply(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
