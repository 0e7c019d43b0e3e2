"""Alerts and lockout: thresholds over sliding windows, and growing back-off (DESIGN.md §8).

Pure: no I/O, no clock. The caller feeds every audited event with its time
(:meth:`Watch.observe`), publishes the :class:`Alert` objects it returns, asks
:meth:`Watch.locked` before it lets a login through, persists :meth:`Watch.remembered`
and hands it back to :meth:`Watch.restore` after a restart.

Theory of operation
-------------------

Four thresholds (:class:`~ubicore.config.model.AuditConfig`) each keep one window per
subject::

    failed_logins_per_user      action "login", outcome "failed"   per principal   locks the user
    failed_logins_per_address   action "login", outcome "failed"   per address     locks the address
    denials_per_user            action "denied"                    per principal   alert only
    rejected_per_address        action "rejected"                  per address     alert only

A window is a deque of event times. An event at ``t`` first drops the times ``<= t -
window_s``, then appends ``t``; when the deque holds ``count`` times the threshold fires
one :class:`Alert` and the deque is emptied, so a continuing attack fires again after
``count`` more events rather than at every event. An empty principal or address is no
subject and is not counted.

A failed-login alert also locks its subject out. The subject's ``strikes`` grow by one
per lockout and the lockout lasts ``min(lockout_max_s, lockout_base_s * 2**(strikes-1))``
from the alert; once ``lockout_forget_s`` has passed since the last lockout ended, the
next one starts again at one strike. A lockout is never shortened by a later one. A
successful login changes nothing: a guesser who finally guesses right keeps its count
and its lockout (refusing the login while :meth:`Watch.locked` says so is the caller's
business). Only an operator's :meth:`Watch.clear` lifts a lockout early.

The watch ignores ``skip_users_containing``: a failed login names a user the client
chose, so skipping names containing the filter would let a guesser opt out of lockout.

Memory stays bounded under a flood of distinct names or addresses: each threshold keeps
at most ``max_subjects`` windows and drops the least recently seen one; each lockout kind
keeps at most ``max_subjects`` records and, when over, drops first the records whose
strikes are already forgotten, then ended lockouts (earliest ended first), and an active
lockout only when every record is active (the one ending soonest).

Times are seconds on the caller's clock. They should not go backwards; an event time
earlier than one already seen is taken as the latest time seen, so windows stay ordered.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ubicore.config.model import AuditConfig, Threshold

__all__ = ["ALERT_KINDS", "LOCKOUT_KINDS", "Alert", "Lockout", "Watch"]

ALERT_KINDS = ("failed_logins_per_user", "failed_logins_per_address", "denials_per_user",
               "rejected_per_address")
LOCKOUT_KINDS = ("user", "address")

_LOCKS = {"failed_logins_per_user": "user", "failed_logins_per_address": "address"}
_MAX_DOUBLINGS = 64  # 2**64 times any base exceeds any lockout_max_s the site file allows


@dataclass(frozen=True, slots=True)
class Alert:
    """A threshold crossed: ``count`` events of ``kind`` for ``subject`` within ``window_s``
    up to ``time``. ``lockout_s`` is how long the subject is now locked out (0.0: none)."""

    time: float
    kind: str
    subject: str
    count: int
    window_s: float
    lockout_s: float


@dataclass(frozen=True, slots=True)
class Lockout:
    """A user or an address locked out from ``since`` until ``until``; ``strikes`` counts
    its lockouts in a row (1 for the first, each next one lasting twice as long)."""

    kind: str
    subject: str
    since: float
    until: float
    strikes: int


class _Windows:
    """One threshold's sliding windows, one per subject, the least recently seen evicted."""

    def __init__(self, threshold: Threshold, max_subjects: int) -> None:
        self.count = threshold.count
        self.window_s = threshold.window_s
        self.max_subjects = max_subjects
        self.windows: OrderedDict[str, deque[float]] = OrderedDict()

    def add(self, subject: str, time: float) -> int:
        """Count an event; the number of events in the window if that crosses the threshold
        (the window starts empty again), else 0."""
        window = self.windows.get(subject)
        if window is None:
            window = self.windows[subject] = deque()
            if len(self.windows) > self.max_subjects:
                self.windows.popitem(last=False)
        else:
            self.windows.move_to_end(subject)
        horizon = time - self.window_s
        while window and window[0] <= horizon:
            window.popleft()
        window.append(time)
        if len(window) < self.count:
            return 0
        fired = len(window)
        window.clear()
        return fired

    def reset(self, subject: str) -> None:
        self.windows.pop(subject, None)


class Watch:
    """Counts audited events against the site's thresholds; see the module docstring."""

    def __init__(
        self, config: AuditConfig, *, max_subjects: int = 10_000, countable: Callable[[str], bool] = lambda user: True,
    ) -> None:
        """``countable(user)``: whether a user's failed logins count per user (and may lock
        it out); the others count per address only. The core counts the site's password
        users: a made-up name has no password to guess (and a flood of them would evict
        real users' windows), a service user's is random (locking it out would stop the
        site's own processes)."""
        self._countable = countable
        if max_subjects < 1:
            raise ValueError(f"max_subjects must be at least 1, got {max_subjects}")
        for kind in ALERT_KINDS:
            threshold: Threshold = getattr(config, kind)
            if threshold.count < 1 or not threshold.window_s > 0:
                raise ValueError(f"{kind}: expected count >= 1 and window_s > 0, got {threshold}")
        if not 0 < config.lockout_base_s <= config.lockout_max_s or config.lockout_forget_s < 0:
            raise ValueError("expected 0 < lockout_base_s <= lockout_max_s and lockout_forget_s >= 0")
        self._config = config
        self._max_subjects = max_subjects
        self._windows = {kind: _Windows(getattr(config, kind), max_subjects) for kind in ALERT_KINDS}
        self._locks: dict[str, dict[str, Lockout]] = {kind: {} for kind in LOCKOUT_KINDS}
        self._latest = float("-inf")

    # -- events ---------------------------------------------------------------------------

    def observe(self, *, time: float, action: str, outcome: str, principal: str,
                address: str) -> list[Alert]:
        """Count one audited event; the alerts it fires (most often none). ``action`` is
        ``"login"`` (with ``outcome`` ``"failed"`` counted), ``"denied"`` or ``"rejected"``;
        any other event counts nothing."""
        self._latest = now = max(time, self._latest)
        counted: list[tuple[str, str]] = []
        if action == "login" and outcome == "failed":
            counted = [("failed_logins_per_user", principal if self._countable(principal) else ""),
                       ("failed_logins_per_address", address)]
        elif action == "denied":
            counted = [("denials_per_user", principal)]
        elif action == "rejected":
            counted = [("rejected_per_address", address)]
        alerts: list[Alert] = []
        for kind, subject in counted:
            if not subject:
                continue
            windows = self._windows[kind]
            fired = windows.add(subject, now)
            if fired:
                lock_kind = _LOCKS.get(kind)
                lockout_s = self._lock(lock_kind, subject, now) if lock_kind else 0.0
                alerts.append(Alert(now, kind, subject, fired, windows.window_s, lockout_s))
        return alerts

    def _lock(self, kind: str, subject: str, now: float) -> float:
        config = self._config
        locks = self._locks[kind]
        previous = locks.pop(subject, None)  # re-inserted last: dict order is lock order
        strikes = 1
        until = now
        if previous is not None and now - previous.until < config.lockout_forget_s:
            strikes = previous.strikes + 1
            until = previous.until
        duration = min(config.lockout_max_s,
                       config.lockout_base_s * 2.0 ** min(strikes - 1, _MAX_DOUBLINGS))
        locks[subject] = Lockout(kind, subject, now, max(until, now + duration), strikes)
        self._trim(locks, now)
        return duration

    def _trim(self, locks: dict[str, Lockout], now: float) -> None:
        """Keep at most ``max_subjects`` records: drop forgotten and ended lockouts down to
        three quarters of it (so the sort is paid once per many lockouts), active ones only
        down to the limit itself, the soonest ending first."""
        if len(locks) <= self._max_subjects:
            return
        goal = self._max_subjects * 3 // 4
        for record in sorted(locks.values(), key=lambda lock: lock.until):
            if len(locks) <= goal or (record.until > now and len(locks) <= self._max_subjects):
                break
            del locks[record.subject]

    # -- queries and operator actions -----------------------------------------------------

    def locked(self, kind: str, subject: str, now: float) -> Lockout | None:
        """The lockout of the ``"user"`` or ``"address"`` ``subject`` while ``now < until``,
        else ``None``."""
        record = self._locks[_lock_kind(kind)].get(subject)
        return record if record is not None and now < record.until else None

    def lockouts(self, now: float) -> list[Lockout]:
        """The lockouts in force at ``now``, sorted by (kind, subject)."""
        return sorted((record for locks in self._locks.values() for record in locks.values()
                       if now < record.until), key=lambda lock: (lock.kind, lock.subject))

    def remembered(self, now: float) -> list[Lockout]:
        """Every lockout whose strikes still count at ``now`` (in force, or ended less than
        ``lockout_forget_s`` ago), sorted by (kind, subject): what to persist for
        :meth:`restore`, so a restart neither lifts a lockout nor resets the back-off."""
        forget_s = self._config.lockout_forget_s
        return sorted((record for locks in self._locks.values() for record in locks.values()
                       if now - record.until < forget_s), key=lambda lock: (lock.kind, lock.subject))

    def clear(self, kind: str, subject: str) -> bool:
        """An operator's clear: the subject's lockout and strikes are gone and its failed-login
        window starts empty. True if it had a lockout on record (in force or remembered)."""
        kind = _lock_kind(kind)
        window = "failed_logins_per_user" if kind == "user" else "failed_logins_per_address"
        self._windows[window].reset(subject)
        return self._locks[kind].pop(subject, None) is not None

    def restore(self, lockouts: Iterable[Lockout]) -> None:
        """Take back persisted lockouts after a restart (each replaces any record of the
        same subject)."""
        for record in lockouts:
            locks = self._locks[_lock_kind(record.kind)]
            locks.pop(record.subject, None)
            locks[record.subject] = record
            self._trim(locks, self._latest)

    @property
    def tracked(self) -> int:
        """How many windows and lockout records the watch holds (at most 6 × max_subjects)."""
        return (sum(len(w.windows) for w in self._windows.values())
                + sum(len(locks) for locks in self._locks.values()))


def _lock_kind(kind: str) -> str:
    if kind not in LOCKOUT_KINDS:
        raise ValueError(f"lockout kind must be 'user' or 'address', got {kind!r}")
    return kind
