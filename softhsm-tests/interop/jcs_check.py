"""Checks lavd audit leaves against an independent RFC 8785 (JCS) encoder,
Python `rfc8785` (Trail of Bits), written from PROTOCOL.md §6 ("a leaf is
canonical JSON"), not from lavd's code.

  jcs_check.py FILE    FILE holds one leaf a line, base64url (no padding)
                       of the exact leaf bytes. Each leaf must parse as JSON
                       and be byte for byte what rfc8785 writes for it.
                       Prints one line per event type, `EVENT COUNT`,
                       sorted.

Any leaf that differs exits 1, naming its line and both forms on stderr.
"""

import base64
import collections
import json
import sys

import rfc8785


def main() -> int:
    counts = collections.Counter()
    with open(sys.argv[1], encoding="ascii") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            leaf = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            value = json.loads(leaf.decode("utf-8"))
            canonical = rfc8785.dumps(value)
            if canonical != leaf:
                sys.stderr.write(
                    f"line {number}: not RFC 8785 canonical\n"
                    f"  leaf:    {leaf!r}\n  rfc8785: {canonical!r}\n"
                )
                return 1
            counts[value["event"]] += 1
    for event, count in sorted(counts.items()):
        print(f"{event} {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
