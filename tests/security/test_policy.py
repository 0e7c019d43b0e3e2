"""Where an instance's security decisions come from (ubicore/security/policy.py):
:class:`PolicySource` (the latest model, its version and subscribers, the key of fake
records), :class:`ModelPolicy` (one instance's view, moving only at ``refresh()``) and
:class:`StaticPolicy` (fixed users, for tests and embedded instances). Pure: no I/O.
"""

from __future__ import annotations

import pytest

from ubicore.schema import Protection
from ubicore.security.amp import VerifierRecord, fake_record, make_verifier
from ubicore.security.model import Group, Membership, PolicyModel, Rule, User, UserKind
from ubicore.security.policy import (
    ModelPolicy,
    PolicySource,
    Right,
    StaticPolicy,
    check_user_name,
)
from ubicore.security.primitives import DEFAULT_KDF, KdfParams, Secret

KDF = KdfParams(t=1, p=1, m_kib=64)
SITE = "policy-site"
SCHEMA = "A::X"


def rec(user: str) -> VerifierRecord:
    return VerifierRecord(user, b"s" * 16, KDF, b"v" * 32)


def model(*, reader: str = "alice", level: Protection | None = None) -> PolicyModel:
    """``reader`` reads everything through ``readers``; ``boss`` updates; ``svc`` is uid 4242."""
    return PolicyModel(
        users=[User(reader, record=rec(reader)), User("boss", record=rec("boss")),
               User("svc", UserKind.OS, uid=4242)],
        groups=[Group("readers", "a reader"), Group("admin", "an administrator", frozenset({"readers"}))],
        members=[Membership(reader, "readers", "Site"), Membership("boss", "admin", "Site"),
                 Membership("svc", "readers", "Site")],
        rules=[Rule("readers", "default", "default", Right.READ), Rule("admin", "A", "default", Right.UPDATE)],
        levels={SCHEMA: level} if level else {},
    )


# --- PolicySource -------------------------------------------------------------------------------


def test_a_new_source_knows_nobody_until_its_first_model() -> None:
    source = PolicySource(SITE)
    assert (source.version, source.ready, source.site) == (0, False, SITE)
    assert source.fake_params == DEFAULT_KDF
    view = source.policy()
    assert view.verifier("alice") is None and view.right("alice", SCHEMA, "Site") is Right.NONE
    assert view.refresh() is False
    source.update(model())
    assert (source.version, source.ready) == (1, True)


def test_update_bumps_the_version_and_tells_every_subscriber() -> None:
    source = PolicySource(SITE)
    calls: list[tuple[str, int]] = []
    stop_a = source.subscribe(lambda: calls.append(("a", source.version)))
    source.subscribe(lambda: calls.append(("b", source.version)))
    source.update(model())
    source.update(model())
    assert source.version == 2
    assert calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]  # after the model is in, in order
    stop_a()
    stop_a()  # twice is harmless
    source.update(model())
    assert calls[4:] == [("b", 3)]


def test_a_subscriber_may_unsubscribe_itself_while_being_told() -> None:
    source = PolicySource(SITE)
    seen: list[str] = []

    def once() -> None:
        seen.append("once")
        stop()

    stop = source.subscribe(once)
    source.subscribe(lambda: seen.append("always"))
    source.update(model())
    source.update(model())
    assert seen == ["once", "always", "always"]


def test_a_view_moves_to_a_new_model_only_at_refresh() -> None:
    source = PolicySource(SITE)
    source.update(model(reader="alice"))
    view = source.policy()  # starts at the source's current model
    assert view.right("alice", SCHEMA, "Site") is Right.READ
    source.update(model(reader="carol"))
    source.update(model(reader="dave"))
    assert view.right("alice", SCHEMA, "Site") is Right.READ  # not yet
    assert view.verifier("dave") is None
    assert view.refresh() is True  # once for both updates
    assert view.refresh() is False
    assert view.right("alice", SCHEMA, "Site") is Right.NONE and view.right("dave", SCHEMA, "Site") is Right.READ
    assert view.verifier("dave") == rec("dave")
    assert view.model is source.model


def test_two_views_of_one_source_each_see_the_change() -> None:
    source = PolicySource(SITE)
    source.update(model())
    one, two = ModelPolicy(source), source.policy()
    source.update(model(reader="carol", level=Protection.FULL))
    assert one.refresh() is True
    assert one.level(SCHEMA) is Protection.FULL and two.level(SCHEMA) is None  # two has not refreshed
    assert two.refresh() is True
    assert two.level(SCHEMA) is Protection.FULL
    assert one.refresh() is two.refresh() is False
    assert one.site == two.site == SITE


def test_a_view_answers_from_its_model() -> None:
    source = PolicySource(SITE)
    source.update(model())
    view = source.policy()
    assert view.verifier("boss") == rec("boss")
    assert view.verifier("svc") is None  # an OS user has no password
    assert view.os_user(4242) == "svc" and view.os_user(1) is None
    assert view.right("boss", SCHEMA, "Zone-A") is Right.UPDATE
    assert view.right("boss", "B::Y", "Zone-A") is Right.READ  # through readers
    assert view.right("svc", SCHEMA, "Site") is Right.READ
    assert view.granting_groups(SCHEMA, "Site", Right.UPDATE) == ["an administrator"]
    assert view.granting_groups(SCHEMA, "Site", Right.READ) == ["an administrator", "a reader"]
    assert view.granting_groups("B::Y", "Site", Right.UPDATE) == []
    assert view.level(SCHEMA) is None


# --- the key of fake records ----------------------------------------------------------------------


def test_the_server_secret_comes_from_the_fake_key_else_is_random_and_stable() -> None:
    a, b = PolicySource(SITE), PolicySource(SITE)
    assert len(a.server_secret) == 32
    assert not a.server_secret.equals(b.server_secret)  # random per source
    first = a.server_secret
    a.update(model())  # no key: the same secret
    assert a.server_secret is first
    a.update(model(), fake_key=b"k" * 16)  # not a key: ignored
    assert a.server_secret is first
    view = a.policy()
    ghost = fake_record(view.server_secret, "ghost", KDF)
    assert fake_record(view.server_secret, "ghost", KDF) == ghost  # stable per name
    a.update(model(), fake_key=b"K" * 32, kdf=KDF)
    assert a.server_secret.equals(b"K" * 32) and a.fake_params == KDF
    assert view.server_secret.equals(b"K" * 32) and view.fake_params == KDF  # at once, no refresh needed
    assert fake_record(view.server_secret, "ghost", KDF) != ghost
    b.update(model(), fake_key=b"K" * 32)  # the site's key: every process makes the same fake records
    assert fake_record(b.server_secret, "ghost", KDF) == fake_record(view.server_secret, "ghost", KDF)
    a.update(model())
    assert a.server_secret.equals(b"K" * 32) and a.fake_params == KDF  # kept until a new one comes


def test_no_repr_shows_a_secret() -> None:
    key = bytes(range(32))
    source = PolicySource(SITE)
    source.update(model(), fake_key=key)
    static = StaticPolicy(SITE, server_secret=Secret(key), fake_params=KDF)
    static.add_user("alice", "hunter2-hunter2", Right.READ)
    record = static.verifier("alice")
    assert record is not None
    for obj in (source, source.policy(), static, source.server_secret, static.server_secret):
        text = repr(obj) + str(obj)
        for secret in (key, record.verifier, record.salt):
            assert secret.hex() not in text and repr(secret) not in text and str(secret) not in text
        assert "hunter2" not in text
    assert SITE in repr(source) and "v1" in repr(source)
    assert "alice" in repr(static)


# --- StaticPolicy ---------------------------------------------------------------------------------


def test_static_policy_basics() -> None:
    p = StaticPolicy(SITE, fake_params=KDF, groups={Right.UPDATE: ["an administrator"]})
    assert p.refresh() is False
    p.add_user("alice", "pw-a", Right.READ)
    record = p.verifier("alice")
    assert record is not None and record.user == "alice" and record.params == KDF
    assert record.salt != make_verifier("alice", SITE, "pw-a", KDF).salt  # a fresh salt each time
    assert p.right("alice", SCHEMA, "Site") is Right.READ and p.right("ghost", SCHEMA, "Site") is Right.NONE
    assert p.refresh() is True and p.refresh() is False
    p.set_right("alice", Right.UPDATE)
    assert p.right("alice", "B::Y", "Zone-A") is Right.UPDATE  # one right for everything
    assert p.verifier("alice") is record
    p.set_level(SCHEMA, Protection.FULL)
    assert p.level(SCHEMA) is Protection.FULL and p.level("B::Y") is None
    p.set_level(SCHEMA, None)
    assert p.level(SCHEMA) is None
    p.os_users[4242] = "svc"
    assert p.os_user(4242) == "svc" and p.os_user(1) is None
    assert p.granting_groups(SCHEMA, "Site", Right.UPDATE) == ["an administrator"]
    assert p.granting_groups(SCHEMA, "Site", Right.READ) == []
    assert p.refresh() is True
    p.remove_user("alice")
    p.remove_user("alice")  # harmless
    assert p.verifier("alice") is None and p.right("alice", SCHEMA, "Site") is Right.NONE
    assert p.refresh() is True
    assert len(p.server_secret) == 32
    assert not p.server_secret.equals(StaticPolicy(SITE).server_secret)


@pytest.mark.parametrize("name", ["alice", "a.b@c-d_e", "x" * 64, "0"])
def test_user_names_that_are_accepted(name: str) -> None:
    assert check_user_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "a/b", "caf\u00e9", "a:b"])
def test_user_names_that_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_user_name(name)
