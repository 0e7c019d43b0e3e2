"""Freeze the project's AMP known-answer vectors into tests/vectors/amp_v1.json.

Run once, from the repository root::

    python -m tests.vectors.make_amp_vectors          # refuses to overwrite
    python -m tests.vectors.make_amp_vectors --force  # only for a new profile version

The inputs below are fixed; every intermediate is computed by the profile's algebra in
closed form (``spec_exchange`` in tests/security/amp_reference.py, integers and hashlib, not
amp.py), then the same exchange is replayed through the real handshake objects with the
same injected randomness and must agree before anything is written. Once frozen, the
vectors are a record: a change to amp.py that alters any value is a protocol change.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from tests.security.amp_reference import (
    SUITE,
    replay_with_objects,
    spec_exchange,
    spec_fake_record,
)
from ubicore.security.primitives import KdfParams

OUT = Path(__file__).resolve().parent / "amp_v1.json"


def _seed(label: str, n: int) -> bytes:
    return hashlib.sha512(b"ubicore AMP-v1 vector " + label.encode()).digest()[:n]


INPUTS = {
    "user": "alice",
    "site": "vector-site",
    "password": "correct horse battery staple",
    "salt": bytes(range(16)),
    "params": KdfParams(t=1, p=1, m_kib=64),
    "x_wide": _seed("x", 64),
    "y_wide": _seed("y", 64),
    "nonce": _seed("nonce", 12),
    "payload": b"data keys for schema demo, version 7",
    "context": b"schema:demo",
    "version": 7,
}
FAKE = {"server_secret": _seed("server secret", 32), "user": "ghost"}


def main(argv: list[str]) -> int:
    if OUT.exists() and "--force" not in argv:
        print(f"{OUT} exists; the vectors are frozen (use --force for a new profile version)", file=sys.stderr)
        return 1
    values = spec_exchange(INPUTS)
    got = replay_with_objects(INPUTS)
    assert got["record"].verifier == values["V"] and got["pi"] == values["pi"]
    assert got["hello"].g1 == values["G1"] and got["challenge"].g2 == values["G2"]
    assert got["confirm"].h_c == values["H_C"] and got["grant"].h_s == values["H_S"]
    assert got["grant"].nonce == values["nonce"] and got["grant"].wrapped == values["wrapped"]
    assert got["K_sess_client"] == got["K_sess_server"] == values["K_sess"]
    fake = spec_fake_record(FAKE["server_secret"], FAKE["user"])
    params = INPUTS["params"]
    doc = {
        "description": "AMP-style key exchange, profile shared/design/amp.md; all byte values hex; "
        "scalars 32-byte little-endian; x_wide and y_wide are the 64 random bytes each side draws",
        "suite": SUITE,
        "inputs": {
            **{k: (v.hex() if isinstance(v, bytes) else v) for k, v in INPUTS.items() if k != "params"},
            "params": {"t": params.t, "p": params.p, "m_kib": params.m_kib},
        },
        "intermediates": {k: v.hex() for k, v in values.items()},
        "fake_record": {
            "server_secret": FAKE["server_secret"].hex(), "user": FAKE["user"],
            "salt": fake["salt"].hex(), "V": fake["V"].hex(),
        },
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
