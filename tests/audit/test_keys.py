"""The audit key file (layout, atomic creation that never overwrites, refusal of
symlinks, other owners, loose modes and damaged bytes, one-line errors with the fix) and
the checkpoint file (round trip, a torn tail from a crash tolerated and cut, any other
malformed line named). These tests run as root, so "another owner" is uid 4242."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from ubicore.audit.chain import (
    AuditError,
    AuditKeyError,
    Chain,
    Event,
    verify,
    verify_checkpoint,
)
from ubicore.audit.keys import (
    KEY_FILE_BYTES,
    AuditKeys,
    append_checkpoint,
    create_keys,
    encode_checkpoint,
    load_keys,
    load_or_create_keys,
    read_checkpoints,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chown to another account needs root")


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --- the key file ---------------------------------------------------------------------------------


def test_created_keys_load_back(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    keys = create_keys(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_keys(path)
    assert loaded.mac_key.equals(keys.mac_key) and loaded.signing_seed.equals(keys.signing_seed)
    assert bytes(loaded.verify_key) == bytes(keys.verify_key)
    assert os.listdir(tmp_path) == ["audit.key"]  # no temp file left behind


def test_the_key_file_has_the_documented_layout(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    keys = create_keys(path)
    data = path.read_bytes()
    assert len(data) == KEY_FILE_BYTES == 105
    assert data[:8] == b"UBIAUDK\n" and data[8] == 1
    assert data[9:41] == keys.mac_key.value and data[41:73] == keys.signing_seed.value
    assert data[73:] == hashlib.sha256(data[:73]).digest()


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    create_keys(path)
    before = path.read_bytes()
    with pytest.raises(AuditKeyError, match="already exists; refusing to overwrite") as exc:
        create_keys(path)
    one_line(exc)
    assert path.read_bytes() == before
    link = tmp_path / "dangling.key"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(AuditKeyError, match="already exists"):
        create_keys(link)
    assert not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["audit.key", "dangling.key"]


def test_create_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AuditKeyError, match="cannot create the audit key file") as exc:
        create_keys(tmp_path / "no" / "audit.key")
    one_line(exc)


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    first = load_or_create_keys(path)
    second = load_or_create_keys(path)
    assert second.mac_key.equals(first.mac_key) and bytes(second.verify_key) == bytes(first.verify_key)


def test_a_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AuditKeyError, match="no audit key file here") as exc:
        load_keys(tmp_path / "audit.key")
    one_line(exc)


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    create_keys(tmp_path / "real.key")
    (tmp_path / "audit.key").symlink_to(tmp_path / "real.key")
    with pytest.raises(AuditKeyError, match="symlink") as exc:
        load_keys(tmp_path / "audit.key")
    one_line(exc)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700, 0o610, 0o4600, 0o1600])
def test_loose_modes_are_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "audit.key"
    create_keys(path)
    os.chmod(path, mode)
    with pytest.raises(AuditKeyError) as exc:
        load_keys(path)
    assert f"mode {mode:04o}" in one_line(exc) and f"fix it with: chmod 600 {path}" in str(exc.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o200 | 0o400])
def test_strict_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "audit.key"
    create_keys(path)
    os.chmod(path, mode)
    load_keys(path)


@needs_root
def test_another_owner_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    create_keys(path)
    os.chown(path, 4242, 4242)
    with pytest.raises(AuditKeyError) as exc:
        load_keys(path)
    text = one_line(exc)
    assert "belongs to 4242" in text and f"fix it with: chown root {path}" in text
    os.chown(path, 0, 4242)  # root's file with another group is fine (the mode keeps the group out)
    load_keys(path)


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    (tmp_path / "audit.key").mkdir(mode=0o700)
    with pytest.raises(AuditKeyError, match="not a regular file"):
        load_keys(tmp_path / "audit.key")


def _damage(data: bytes, how: str) -> bytes:
    if how == "empty":
        return b""
    if how == "truncated":
        return data[:-1]
    if how == "extended":
        return data + b"\0"
    if how == "magic":
        return b"NOTAUDK\n" + data[8:]
    if how == "version":
        return data[:8] + b"\x02" + data[9:]
    if how == "mac key bit":
        return data[:20] + bytes([data[20] ^ 1]) + data[21:]
    if how == "seed bit":
        return data[:50] + bytes([data[50] ^ 0x80]) + data[51:]
    if how == "checksum bit":
        return data[:-1] + bytes([data[-1] ^ 1])
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("empty", "not an audit key file"),
        ("truncated", "damaged (104 bytes"),
        ("extended", "damaged (106 bytes"),
        ("magic", "not an audit key file"),
        ("version", "version 2 is not supported"),
        ("mac key bit", "damaged (checksum mismatch)"),
        ("seed bit", "damaged (checksum mismatch)"),
        ("checksum bit", "damaged (checksum mismatch)"),
    ],
)
def test_a_damaged_key_file_is_a_clear_error(tmp_path: Path, how: str, message: str) -> None:
    path = tmp_path / "audit.key"
    keys = create_keys(path)
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(AuditKeyError) as exc:
        load_keys(path)
    text = one_line(exc)
    assert message in text and str(path) in text
    assert keys.mac_key.value.hex() not in text


def test_key_secrets_never_show(tmp_path: Path) -> None:
    keys = create_keys(tmp_path / "audit.key")
    secrets = (keys.mac_key.value, keys.signing_seed.value)
    for text in (repr(keys), str(keys), f"{keys}", repr(keys.mac_key), str(keys.signing_seed)):
        for secret in secrets:
            assert secret.hex() not in text and str(secret) not in text
    assert keys.fingerprint() in repr(keys)
    assert not hasattr(keys, "__dict__")
    with pytest.raises(ValueError):
        AuditKeys(b"short", b"x" * 32)


# --- the checkpoint file --------------------------------------------------------------------------

EVENT = Event(1_714_557_600.1, "h1", "Site", "Counter::Main", "ann", "10.0.0.1", "update", "ok", "incr")


def grow(chain: Chain, n: int) -> list:  # type: ignore[type-arg]
    return [chain.append(replace(EVENT, time=EVENT.time + i), "o") for i in range(n)]


def test_checkpoints_round_trip_through_the_file(tmp_path: Path) -> None:
    keys = AuditKeys.generate()
    path = tmp_path / "audit.checkpoints"
    chain = Chain(keys)
    cps = []
    for t in (0.1 + 0.2, 1_714_557_600.123456789, 1e-300, -5.5):
        grow(chain, 3)
        cp = chain.checkpoint(t)
        append_checkpoint(path, cp)
        cps.append(cp)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_checkpoints(path) == cps
    assert all(verify_checkpoint(cp, keys.verify_key) for cp in read_checkpoints(path))
    assert len(path.read_bytes().splitlines()) == 4


def test_a_missing_checkpoint_file_reads_as_none(tmp_path: Path) -> None:
    assert read_checkpoints(tmp_path / "audit.checkpoints") == []


def test_a_torn_last_line_is_ignored_and_cut_by_the_next_append(tmp_path: Path) -> None:
    keys = AuditKeys.generate()
    path = tmp_path / "audit.checkpoints"
    chain = Chain(keys)
    records = grow(chain, 5)
    first = chain.checkpoint(10.0)
    append_checkpoint(path, first)
    records += grow(chain, 5)
    second = chain.checkpoint(20.0)
    with open(path, "ab") as f:  # the crash: only part of the line reached the disk
        f.write(encode_checkpoint(second)[:57])
    assert read_checkpoints(path) == [first]
    append_checkpoint(path, second)
    assert read_checkpoints(path) == [first, second]
    assert verify(records, keys, read_checkpoints(path)).ok
    assert_truncation_caught = verify(records[:7], keys, read_checkpoints(path))
    assert not assert_truncation_caught.ok and assert_truncation_caught.first_bad == 8


def test_a_file_of_only_a_torn_line_reads_empty_and_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "audit.checkpoints"
    path.write_bytes(b'{"seq": 3, "ti')
    assert read_checkpoints(path) == []
    cp = Chain(AuditKeys.generate()).checkpoint(1.0)
    append_checkpoint(path, cp)
    assert read_checkpoints(path) == [cp]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "not a JSON object"),
        (b"garbage", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"seq": 1}', "exactly the keys"),
        (b'{"seq": -1, "time": 1.0, "hash": "' + b"0" * 64 + b'", "signature": "' + b"0" * 128 + b'"}', "seq"),
        (b'{"seq": true, "time": 1.0, "hash": "' + b"0" * 64 + b'", "signature": "' + b"0" * 128 + b'"}', "seq"),
        (b'{"seq": 1, "time": NaN, "hash": "' + b"0" * 64 + b'", "signature": "' + b"0" * 128 + b'"}', "NaN"),
        (b'{"seq": 1, "time": 1e400, "hash": "' + b"0" * 64 + b'", "signature": "' + b"0" * 128 + b'"}', "time"),
        (b'{"seq": 1, "time": "now", "hash": "' + b"0" * 64 + b'", "signature": "' + b"0" * 128 + b'"}', "time"),
        (b'{"seq": 1, "time": 1.0, "hash": "' + b"0" * 63 + b'", "signature": "' + b"0" * 128 + b'"}', "hash"),
        (b'{"seq": 1, "time": 1.0, "hash": "' + b"A" * 64 + b'", "signature": "' + b"0" * 128 + b'"}', "hash"),
        (b'{"seq": 1, "time": 1.0, "hash": "' + b"0" * 64 + b'", "signature": "zz"}', "signature"),
        (b"\xff\xfe", "not a JSON object"),
    ],
)
def test_a_malformed_line_is_an_error_naming_it(tmp_path: Path, line: bytes, message: str) -> None:
    path = tmp_path / "audit.checkpoints"
    cp = Chain(AuditKeys.generate()).checkpoint(1.0)
    path.write_bytes(encode_checkpoint(cp) + line + b"\n" + encode_checkpoint(cp))
    with pytest.raises(AuditError) as exc:
        read_checkpoints(path)
    text = one_line(exc)
    assert f"{path}: line 2:" in text and message in text


def test_a_symlinked_checkpoint_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"")
    (tmp_path / "audit.checkpoints").symlink_to(tmp_path / "real")
    cp = Chain(AuditKeys.generate()).checkpoint(1.0)
    with pytest.raises(AuditError, match="symlink"):
        append_checkpoint(tmp_path / "audit.checkpoints", cp)
    with pytest.raises(AuditError, match="symlink"):
        read_checkpoints(tmp_path / "audit.checkpoints")
    assert (tmp_path / "real").read_bytes() == b""


def test_a_malformed_checkpoint_is_not_appended(tmp_path: Path) -> None:
    cp = Chain(AuditKeys.generate()).checkpoint(1.0)
    with pytest.raises(ValueError):
        append_checkpoint(tmp_path / "cps", replace(cp, signature=b"short"))
    with pytest.raises(ValueError):
        append_checkpoint(tmp_path / "cps", replace(cp, time=float("inf")))
    assert not (tmp_path / "cps").exists()


def test_a_directory_is_not_a_checkpoint_file(tmp_path: Path) -> None:
    (tmp_path / "cps").mkdir()
    with pytest.raises(AuditError, match="not a regular file"):
        read_checkpoints(tmp_path / "cps")
    with pytest.raises(AuditError):
        append_checkpoint(tmp_path / "cps", Chain(AuditKeys.generate()).checkpoint(1.0))
