"""The service-credentials cache (credentials/cache.py, issue 5): the format round trip and
its parser under damage, atomic writes (a writer killed midway, a failing rename), the
reader's owner/mode/symlink/directory checks and their fix lines, removal, the copy to a
backup dataset, and that the scalar never leaks outside the cache file."""

from __future__ import annotations

import fcntl
import grp
import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ubicore.credentials as pkg
import ubicore.errors
from ubicore.credentials.cache import (
    FILE_NAME,
    FORMAT_VERSION,
    MAGIC,
    CachedCredential,
    CredentialsDamaged,
    CredentialsError,
    CredentialsMissing,
    CredentialsUnsafe,
    cache_path,
    check_file,
    copy_cache,
    encode_cache,
    load_credential,
    parse_cache,
    read_cache,
    remove_credential,
    store_credential,
    write_cache,
)
from ubicore.security.primitives import KdfParams, Secret
from ubicore.testing import TEST_KDF

SCALARS: list[bytes] = []


def cred(site: str = "Site1", user: str = "svc", *, checked: str = "online", scalar: bytes | None = None) -> CachedCredential:
    value = scalar if scalar is not None else os.urandom(32)
    SCALARS.append(value)
    return CachedCredential(site=site, user=user, salt=os.urandom(16), params=TEST_KDF, scalar=Secret(value),
                            cached_at=1_700_000_000.25, checked=checked)


def same(a: CachedCredential, b: CachedCredential) -> bool:
    return (a.site, a.user, a.salt, a.params, a.cached_at, a.checked) == (
        b.site, b.user, b.salt, b.params, b.cached_at, b.checked) and a.scalar.equals(b.scalar)


def mode_of(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(f".{FILE_NAME}.") and n.endswith(".tmp"))


def body_file(body: Any, version: int = FORMAT_VERSION) -> bytes:
    """A file with a correct checksum around any msgpack body."""
    head: bytes = MAGIC + bytes([version]) + msgpack.packb(body, use_bin_type=True)
    return head + hashlib.sha256(head).digest()


def entry(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"site": "S", "user": "u", "salt": b"s" * 16, "t": 1, "p": 1, "m_kib": 64,
                            "scalar": b"k" * 32, "cached_at": 1.5, "checked": "offline"}
    base.update(over)
    return base


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    d = tmp_path / "dataset"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


# --- the API and the format ---------------------------------------------------------------------


def test_package_reexports_the_public_names() -> None:
    for name in pkg.__all__:
        assert getattr(pkg, name) is getattr(__import__("ubicore.credentials.cache", fromlist=[name]), name)
    assert CredentialsError is ubicore.errors.CredentialsError
    assert issubclass(CredentialsUnsafe, ubicore.errors.UbiError)
    assert {"CachedCredential", "read_cache", "store_credential", "copy_cache", "check_file"} <= set(pkg.__all__)


def test_round_trip_of_several_sites(dataset: Path) -> None:
    path = cache_path(dataset)
    assert path == dataset / "credentials.dat"
    creds = [cred("Site1", "svc-a"), cred("Backup", "svc-b", checked="offline"), cred("Ünïcode site", "ü")]
    write_cache(path, creds)
    got = read_cache(path)
    assert sorted(got) == sorted(c.site for c in creds)
    for c in creds:
        assert same(got[c.site], c)
        assert same(load_credential(path, c.site), c)
    data = path.read_bytes()
    assert data[:9] == b"UBICRED\n\x01" and hashlib.sha256(data[:-32]).digest() == data[-32:]
    assert data == encode_cache(reversed(creds))  # entries ordered by site: the bytes are canonical


def test_the_documented_layout_byte_by_byte() -> None:
    c = CachedCredential(site="S", user="u", salt=b"s" * 16, params=KdfParams(1, 1, 64), scalar=Secret(b"k" * 32),
                         cached_at=1.5, checked="offline")
    body = (b"\x81\xa7entries\x91\x89"
            b"\xa4site\xa1S" b"\xa4user\xa1u" b"\xa4salt\xc4\x10" + b"s" * 16 +
            b"\xa1t\x01" b"\xa1p\x01" b"\xa5m_kib\x40" b"\xa6scalar\xc4\x20" + b"k" * 32 +
            b"\xa9cached_at\xcb" + bytes.fromhex("3ff8000000000000") + b"\xa7checked\xa7offline")
    head = b"UBICRED\n\x01" + body
    assert encode_cache([c]) == head + hashlib.sha256(head).digest()


def test_store_replaces_per_site_and_keeps_the_others(dataset: Path) -> None:
    path = cache_path(dataset)
    a, b = cred("A"), cred("B")
    store_credential(path, a)
    store_credential(path, b)
    a2 = cred("A", "other-user", checked="offline")
    store_credential(path, a2)
    got = read_cache(path)
    assert sorted(got) == ["A", "B"] and same(got["A"], a2) and same(got["B"], b)


def test_missing_file_and_missing_site(dataset: Path) -> None:
    path = cache_path(dataset)
    with pytest.raises(CredentialsMissing, match="no cached credentials at"):
        read_cache(path)
    with pytest.raises(CredentialsMissing):
        check_file(path)
    store_credential(path, cred("A"))
    with pytest.raises(CredentialsMissing) as err:
        load_credential(path, "Nowhere")
    assert "'Nowhere'" in str(err.value) and str(path) in str(err.value)


def test_invalid_credentials_are_refused_at_construction() -> None:
    good: dict[str, Any] = {"site": "S", "user": "u", "salt": b"s" * 16, "params": TEST_KDF,
                            "scalar": Secret(b"k" * 32), "cached_at": 1.0, "checked": "online"}
    CachedCredential(**good)
    for key, bad in [("site", ""), ("user", ""), ("salt", b"s" * 15), ("params", KdfParams(0, 1, 64)),
                     ("scalar", Secret(b"k" * 31)), ("scalar", b"k" * 32), ("cached_at", float("nan")),
                     ("cached_at", -1.0), ("checked", "maybe"), ("site", b"S")]:
        with pytest.raises((ValueError, TypeError)):
            CachedCredential(**{**good, key: bad})
    with pytest.raises(ValueError, match="twice"):
        encode_cache([cred("A"), cred("A")])


# --- modes, groups and the reader's checks ------------------------------------------------------


def test_written_file_is_0600(dataset: Path) -> None:
    path = cache_path(dataset)
    old = os.umask(0)
    try:
        write_cache(path, [cred()])
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600 and os.stat(path).st_uid == os.geteuid()
    check_file(path)


def test_reader_group_gives_0640_and_the_group(dataset: Path) -> None:
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    path = cache_path(dataset)
    write_cache(path, [cred()], reader_group=group.gr_name)
    st_ = os.stat(path)
    assert stat.S_IMODE(st_.st_mode) == 0o640 and st_.st_gid == group.gr_gid
    assert sorted(read_cache(path)) == ["Site1"]
    store_credential(path, cred("B"))  # no group named: back to the owner alone
    assert mode_of(path) == 0o600


def test_unknown_group_is_refused_before_anything_is_written(dataset: Path) -> None:
    path = cache_path(dataset)
    with pytest.raises(CredentialsError, match="no-such-group-xyz"):
        write_cache(path, [cred()], reader_group="no-such-group-xyz")
    assert os.listdir(dataset) == []
    store_credential(path, cred("A"))
    before = path.read_bytes()
    with pytest.raises(CredentialsError, match="no-such-group-xyz"):
        store_credential(path, cred("B"), reader_group="no-such-group-xyz")
    assert path.read_bytes() == before and temps(dataset) == []


@pytest.mark.parametrize(("mode", "what", "fix"), [
    (0o644, "can be read by other accounts", 600),
    (0o604, "can be read by other accounts", 600),
    (0o660, "can be written by other accounts", 640),
    (0o666, "can be read by other accounts", 600),
    (0o700, "is executable", 600),
    (0o622, "can be written by other accounts", 600),
    (0o602, "can be written by other accounts", 600),
    (0o610, "is executable", 600),
    (0o4600, "setuid", 600),
])
def test_unsafe_modes_are_refused_with_the_chmod_fix(dataset: Path, mode: int, what: str, fix: int) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred()])
    os.chmod(path, mode)
    for call in (check_file, read_cache, lambda p: load_credential(p, "Site1"),
                 lambda p: store_credential(p, cred("B")), lambda p: copy_cache(p, dataset.parent)):
        with pytest.raises(CredentialsUnsafe) as err:
            call(path)
        line = str(err.value)
        assert what in line and f"(mode {mode:04o})" in line and line.endswith(f"fix it with chmod {fix} {path}")
        assert "\n" not in line
    os.chmod(path, 0o600)
    assert sorted(read_cache(path)) == ["Site1"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440])
def test_safe_modes_pass(dataset: Path, mode: int) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred()])
    os.chmod(path, mode)
    check_file(path)
    assert sorted(read_cache(path)) == ["Site1"]


def test_the_exact_message_for_a_world_readable_file(dataset: Path) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred()])
    os.chmod(path, 0o644)
    with pytest.raises(CredentialsUnsafe) as err:
        check_file(path)
    assert str(err.value) == f"{path} can be read by other accounts (mode 0644): fix it with chmod 600 {path}"


def test_another_owner_is_refused_root_is_accepted(dataset: Path) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred()])
    os.chown(path, 4242, -1)
    with pytest.raises(CredentialsUnsafe) as err:
        read_cache(path)
    me = os.geteuid()
    assert str(err.value) == f"{path} is owned by uid 4242, not by you (uid {me}): fix it with chown {me} {path}"
    with pytest.raises(CredentialsUnsafe):
        store_credential(path, cred("B"))
    os.chown(path, 0, -1)  # root-owned files are fine for any reader
    assert sorted(read_cache(path)) == ["Site1"]


def test_symlinks_are_refused_for_reading_and_writing(dataset: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    good = cache_path(elsewhere)
    write_cache(good, [cred()])
    path = cache_path(dataset)
    path.symlink_to(good)  # a link to a perfectly good file is still refused
    for call in (check_file, read_cache, lambda p: write_cache(p, [cred("X")]),
                 lambda p: store_credential(p, cred("X")), lambda p: copy_cache(p, tmp_path)):
        with pytest.raises(CredentialsUnsafe, match="symbolic link"):
            call(path)
    assert path.is_symlink() and sorted(read_cache(good)) == ["Site1"]
    dangling = tmp_path / "d"
    dangling.mkdir()
    (dangling / FILE_NAME).symlink_to(dangling / "nowhere")
    with pytest.raises(CredentialsUnsafe):
        write_cache(dangling / FILE_NAME, [cred()])
    assert not (dangling / "nowhere").exists() and temps(dangling) == []


def test_a_file_swapped_between_the_check_and_the_open_is_refused(dataset: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred("A")])
    other = dataset / "other"
    write_cache(cache_path(tmp_path), [cred("Evil")])
    os.replace(cache_path(tmp_path), other)
    real_open = os.open

    def swapping_open(p: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(p) == path:
            os.replace(other, path)  # what was checked is no longer what is there
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(CredentialsUnsafe, match="was replaced while it was checked"):
        read_cache(path)


def test_non_regular_file_is_refused(dataset: Path) -> None:
    path = cache_path(dataset)
    os.mkfifo(path, 0o600)
    with pytest.raises(CredentialsUnsafe, match="not a regular file"):
        read_cache(path)
    with pytest.raises(CredentialsUnsafe, match="not a regular file"):
        write_cache(path, [cred()])


def test_world_writable_directory_is_refused_unless_sticky(dataset: Path) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred()])
    os.chmod(dataset, 0o777)
    with pytest.raises(CredentialsUnsafe) as err:
        read_cache(path)
    assert str(err.value) == (f"the directory {dataset} can be written by other accounts (mode 0777): "
                              f"fix it with chmod o-w {dataset}")
    with pytest.raises(CredentialsUnsafe):
        store_credential(path, cred("B"))
    os.chmod(dataset, 0o1777)
    assert sorted(read_cache(path)) == ["Site1"]
    store_credential(path, cred("B"))
    os.chmod(dataset, 0o775)  # group-writable is the administrator's choice
    assert sorted(read_cache(path)) == ["B", "Site1"]


# --- damage ---------------------------------------------------------------------------------------


def two_site_file() -> bytes:
    return encode_cache([cred("A"), cred("B", checked="offline")])


def test_every_truncation_is_damaged() -> None:
    data = two_site_file()
    for n in range(len(data)):
        with pytest.raises(CredentialsDamaged):
            parse_cache(data[:n])
    with pytest.raises(CredentialsDamaged):
        parse_cache(data + b"\x00")


def test_every_bit_flip_is_damaged() -> None:
    data = bytearray(two_site_file())
    for i in range(len(data) * 8):
        data[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CredentialsDamaged):
            parse_cache(bytes(data))
        data[i // 8] ^= 1 << (i % 8)
    assert sorted(parse_cache(bytes(data))) == ["A", "B"]


def test_wrong_magic_and_wrong_version() -> None:
    data = two_site_file()
    with pytest.raises(CredentialsDamaged, match="not a ubicore credentials cache"):
        parse_cache(b"UBIXRED\n" + data[8:])
    with pytest.raises(CredentialsDamaged, match="not a ubicore credentials cache"):
        parse_cache(b"user: x\npassword: y\n")
    with pytest.raises(CredentialsDamaged, match="format version 2, this ubicore reads version 1"):
        parse_cache(body_file({"entries": []}, version=2))
    assert parse_cache(body_file({"entries": []})) == {}


@pytest.mark.parametrize("body", [
    None, 1, [], {}, {"entries": {}}, {"entries": [], "more": 1}, {b"entries": []}, {"entries": [1]},
    {"entries": [entry(scalar=b"k" * 31)]}, {"entries": [entry(scalar=b"k" * 33)]},
    {"entries": [entry(scalar="k" * 32)]}, {"entries": [entry(salt=b"s" * 15)]}, {"entries": [entry(salt="s" * 16)]},
    {"entries": [entry(t=0)]}, {"entries": [entry(p=65)]}, {"entries": [entry(m_kib=7)]}, {"entries": [entry(t=True)]},
    {"entries": [entry(t=1.0)]}, {"entries": [entry(m_kib=2**64 - 1)]}, {"entries": [entry(t=-1)]}, {"entries": [entry(cached_at=1)]},
    {"entries": [entry(cached_at=float("inf"))]}, {"entries": [entry(cached_at=-2.0)]},
    {"entries": [entry(checked="never")]}, {"entries": [entry(checked=None)]}, {"entries": [entry(site="")]},
    {"entries": [entry(user=b"u")]}, {"entries": [entry(extra=1)]},
    {"entries": [{k: v for k, v in entry().items() if k != "user"}]},
    {"entries": [entry(), entry()]}, {"entries": [entry(), entry(site="T"), entry()]},
])
def test_checksum_ok_but_bad_fields_are_damaged(body: Any) -> None:
    data = body_file(body)
    with pytest.raises(CredentialsDamaged) as err:
        parse_cache(data, "/x/credentials.dat")
    assert str(err.value).startswith("/x/credentials.dat")
    assert "k" * 31 not in str(err.value)


def test_a_valid_entry_inside_a_hand_made_body_parses() -> None:
    got = parse_cache(body_file({"entries": [entry(), entry(site="T", checked="online")]}))
    assert sorted(got) == ["S", "T"] and got["S"].params == KdfParams(1, 1, 64) and got["S"].scalar.equals(b"k" * 32)


def test_random_bytes_and_garbage_bodies_are_damaged_never_anything_else() -> None:
    rng = random.Random(5)
    good = two_site_file()
    for _ in range(400):
        n = rng.randrange(0, 200)
        junk = rng.randbytes(n)
        for data in (junk, MAGIC + bytes([1]) + junk, _with_checksum(MAGIC + bytes([1]) + junk),
                     _with_checksum(good[:-32][: rng.randrange(9, len(good) - 32)] + junk)):
            try:
                parse_cache(data)
            except CredentialsDamaged:
                pass


def _with_checksum(head: bytes) -> bytes:
    return head + hashlib.sha256(head).digest()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_checksummed_body_parses_or_is_damaged(body: bytes) -> None:
    try:
        parse_cache(_with_checksum(MAGIC + b"\x01" + body))
    except CredentialsDamaged:
        pass


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
                          st.binary(min_size=16, max_size=64), st.binary(min_size=32, max_size=32),
                          st.floats(min_value=0, max_value=4e9), st.sampled_from(["online", "offline"])),
                max_size=5, unique_by=lambda t: t[0]))
def test_encode_then_parse_is_the_identity(rows: list[tuple[str, str, bytes, bytes, float, str]]) -> None:
    creds = [CachedCredential(site=s, user=u, salt=salt, params=KdfParams(2, 1, 64), scalar=Secret(k),
                              cached_at=at, checked=how) for s, u, salt, k, at, how in rows]
    got = parse_cache(encode_cache(creds))
    assert len(got) == len(creds) and all(same(got[c.site], c) for c in creds)


def test_a_damaged_file_on_disk(dataset: Path) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred()])
    data = path.read_bytes()
    with open(path, "r+b") as f:  # keeps the mode: only the contents are hurt
        f.truncate(len(data) - 1)
    with pytest.raises(CredentialsDamaged, match=f"^{path} is damaged: checksum mismatch"):
        read_cache(path)
    # Caching again replaces a damaged file (nothing in it could be read anyway)...
    store_credential(path, cred("B"))
    assert set(read_cache(path)) == {"B"}
    # ...and removing a site's entry from a damaged file removes the file.
    with open(path, "r+b") as f:
        f.truncate(len(path.read_bytes()) - 1)
    assert remove_credential(path, "B") is True and not path.exists()
    write_cache(path, [cred()])
    assert remove_credential(path, None) is True and not path.exists()


# --- atomic writes and crashes --------------------------------------------------------------------


WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from ubicore.credentials.cache import CachedCredential, store_credential
    from ubicore.security.primitives import KdfParams, Secret

    def blocked(fd):
        if os.fstat(fd).st_size > 0 and not os.path.isdir(f"/proc/self/fd/{fd}"):
            print("blocked", flush=True)
            time.sleep(60)
    os.fsync = blocked
    cred = CachedCredential(site="New", user="svc", salt=b"s" * 16, params=KdfParams(1, 1, 64),
                            scalar=Secret(bytes.fromhex(sys.argv[2])), cached_at=2.0, checked="online")
    store_credential(Path(sys.argv[1]), cred)
    print("finished", flush=True)
""")


def test_a_writer_killed_midway_leaves_the_old_file_and_the_next_write_cleans_up(dataset: Path) -> None:
    path = cache_path(dataset)
    old = cred("Old")
    write_cache(path, [old])
    before = path.read_bytes()
    secret = os.urandom(32)
    SCALARS.append(secret)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), secret.hex()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "blocked\n", proc.stderr.read() if proc.stderr else line
        stale = temps(dataset)
        assert len(stale) == 1 and stale[0].startswith(f".credentials.dat.{proc.pid}.")
        assert (dataset / stale[0]).stat().st_size > len(before)  # the new contents, all of them
        assert path.read_bytes() == before  # a reader meanwhile sees the old file
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    got = read_cache(path)
    assert sorted(got) == ["Old"] and same(got["Old"], old)
    assert temps(dataset) == stale and mode_of(dataset / stale[0]) == 0o600
    store_credential(path, cred("Next"))  # the lock died with the writer; the stale file goes
    assert temps(dataset) == [] and sorted(read_cache(path)) == ["Next", "Old"]


def test_a_failing_rename_leaves_the_old_file_and_no_temporary(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred("Old")])
    before = path.read_bytes()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(CredentialsError, match="the old file is unchanged"):
        store_credential(path, cred("New"))
    assert path.read_bytes() == before and temps(dataset) == []

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_cache(path, [cred("New")])
    assert path.read_bytes() == before and temps(dataset) == []
    monkeypatch.undo()
    store_credential(path, cred("New"))
    assert sorted(read_cache(path)) == ["New", "Old"]


def test_a_failing_write_leaves_the_old_file_and_no_temporary(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cache_path(dataset)
    write_cache(path, [cred("Old")])
    before = path.read_bytes()

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(CredentialsError, match="No space left on device"):
        write_cache(path, [cred("New")])
    assert path.read_bytes() == before and temps(dataset) == []


MANY_WRITERS = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from ubicore.credentials.cache import CachedCredential, store_credential
    from ubicore.security.primitives import KdfParams, Secret

    for i in range(8):
        store_credential(Path(sys.argv[1]), CachedCredential(
            site=f"{sys.argv[2]}-{i}", user="svc", salt=b"s" * 16, params=KdfParams(1, 1, 64),
            scalar=Secret(b"k" * 32), cached_at=2.0, checked="online"))
""")


def test_concurrent_writers_lose_no_entry(dataset: Path) -> None:
    path = cache_path(dataset)
    procs = [subprocess.Popen([sys.executable, "-c", MANY_WRITERS, str(path), f"w{n}"]) for n in range(4)]
    for proc in procs:
        assert proc.wait(timeout=30) == 0
    assert sorted(read_cache(path)) == sorted(f"w{n}-{i}" for n in range(4) for i in range(8))
    assert temps(dataset) == []


def test_writers_wait_for_the_directory_lock(dataset: Path) -> None:
    path = cache_path(dataset)
    done = threading.Event()

    def store() -> None:
        store_credential(path, cred("A"))
        done.set()

    dfd = os.open(dataset, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        writer = threading.Thread(target=store)
        writer.start()
        assert not done.wait(0.3) and not path.exists()
    finally:
        os.close(dfd)
    writer.join(timeout=10)
    assert done.is_set() and sorted(read_cache(path)) == ["A"]


def test_write_into_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="does not exist"):
        write_cache(tmp_path / "nope" / FILE_NAME, [cred()])


# --- removal and copying --------------------------------------------------------------------------


def test_remove_one_site_then_the_last(dataset: Path) -> None:
    path = cache_path(dataset)
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    write_cache(path, [cred("A"), cred("B")], reader_group=group.gr_name)
    assert remove_credential(path, "Nowhere") is False
    assert remove_credential(path, "A") is True
    assert sorted(read_cache(path)) == ["B"]
    assert mode_of(path) == 0o640 and os.stat(path).st_gid == group.gr_gid  # the reader group stays
    assert remove_credential(path, "B") is True
    assert not path.exists() and os.listdir(dataset) == []
    assert remove_credential(path, "B") is False


def test_remove_the_whole_file(dataset: Path) -> None:
    path = cache_path(dataset)
    assert remove_credential(path, None) is False
    write_cache(path, [cred("A"), cred("B")])
    (dataset / f".{FILE_NAME}.1.dead.tmp").write_bytes(b"secret leftovers")
    assert remove_credential(path, None) is True
    assert os.listdir(dataset) == []


def test_copy_to_a_backup_dataset(dataset: Path, tmp_path: Path) -> None:
    src = cache_path(dataset)
    creds = [cred("A"), cred("B", checked="offline")]
    write_cache(src, creds)
    backup = tmp_path / "backup"
    backup.mkdir()
    dst = copy_cache(src, backup)
    assert dst == backup / FILE_NAME and mode_of(dst) == 0o600
    got = read_cache(dst)
    assert all(same(got[c.site], c) for c in creds) and len(got) == 2
    assert dst.read_bytes() == src.read_bytes()

    group = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    write_cache(src, creds, reader_group=group.gr_name)
    copy_cache(src, backup)  # the source's reader group comes along
    assert mode_of(dst) == 0o640 and os.stat(dst).st_gid == group.gr_gid
    other = next(g for g in grp.getgrall() if g.gr_gid not in (os.getegid(), group.gr_gid))
    copy_cache(src, backup, reader_group=other.gr_name)
    assert os.stat(dst).st_gid == other.gr_gid

    with pytest.raises(CredentialsError, match="does not exist"):
        copy_cache(src, tmp_path / "missing")
    os.chmod(src, 0o644)
    with pytest.raises(CredentialsUnsafe):
        copy_cache(src, backup)


# --- secrets stay in the file -----------------------------------------------------------------------


def test_secrets_never_leak(dataset: Path, tmp_path: Path) -> None:
    c = cred("A")
    k = c.scalar.value
    for shown in (repr(c), str(c)):
        assert k.hex() not in shown and repr(k) not in shown and "scalar" not in shown
    path = cache_path(dataset)
    write_cache(path, [c, cred("B")])
    backup = tmp_path / "backup"
    backup.mkdir()
    copy_cache(path, backup)
    (dataset / f".{FILE_NAME}.77.dead.tmp").write_bytes(k)  # a killed writer's leftover may hold it

    errors: list[BaseException] = []
    for mode in (0o644, 0o660, 0o700):
        os.chmod(path, mode)
        with pytest.raises(CredentialsError) as err:
            read_cache(path)
        errors.append(err.value)
    os.chmod(path, 0o600)
    with pytest.raises(CredentialsMissing) as missing:
        load_credential(path, "Z")
    errors.append(missing.value)
    data = path.read_bytes()
    for bad in (data[:-1], data[:100], b"UBICRED\n\x02" + data[9:], body_file({"entries": [entry(scalar=k[:31])]}),
                body_file({"entries": [entry(scalar=k, t=0)]})):
        with pytest.raises(CredentialsDamaged) as damaged:
            parse_cache(bad)
        errors.append(damaged.value)
    for e in errors:
        assert k.hex() not in str(e) and repr(k) not in str(e) and repr(k[:31]) not in str(e)

    allowed = {FILE_NAME}
    for root, _dirs, files in os.walk(tmp_path):
        for name in files:
            content = (Path(root) / name).read_bytes()
            if name in allowed or (name.startswith(f".{FILE_NAME}.") and name.endswith(".tmp")):
                continue
            assert all(s not in content for s in SCALARS), f"{name} holds a scalar"
    assert k in path.read_bytes() and k in cache_path(backup).read_bytes()
