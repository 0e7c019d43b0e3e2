"""The parsed site: frozen site, host, cell, deployment and instance-plan objects.

:func:`ubicore.config.site.parse_site` builds these; see :mod:`ubicore.config.site` for
the file format. Dataclasses are frozen, mappings are read-only proxies, sequences are
tuples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PROTECTIONS", "ROOT_CELL", "AuditConfig", "CellConfig", "CoreConfig", "Deployment",
           "HostConfig", "InstancePlan", "SecurityConfig", "SiteConfig", "Threshold"]

ROOT_CELL = "Site"
PROTECTIONS = ("open", "update", "full")


@dataclass(frozen=True, slots=True)
class HostConfig:
    """A machine of the site: its ``name`` in the site file and the ``address`` to reach it."""

    name: str
    address: str


@dataclass(frozen=True, slots=True)
class CellConfig:
    """One cell of the tree; ``parent`` is ``None`` only for the root ``Site``."""

    name: str
    level: str
    host: str
    parent: str | None
    children: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Deployment:
    """One entry of ``deployments``: a schema at every cell of ``level``, or at ``cell``."""

    schema: str
    level: str | None
    cell: str | None
    protection: str | None
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """One schema instance to run: ``schema`` at ``cell``, on ``host``."""

    schema: str
    cell: str
    host: str
    protection: str | None
    options: Mapping[str, Any]


def _endpoint(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Where the core runs: its host, that host's address and the naming registry ports."""

    host: str
    address: str
    rpc_port: int
    event_port: int

    @property
    def rpc_endpoint(self) -> str:
        """The naming registry RPC endpoint, ``tcp://ADDR:PORT`` (IPv6 in brackets)."""
        return _endpoint(self.address, self.rpc_port)

    @property
    def event_endpoint(self) -> str:
        """The naming registry event channel endpoint, ``tcp://ADDR:PORT``."""
        return _endpoint(self.address, self.event_port)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """The site file's ``security`` section: session lifetime and group-key rotation."""

    session_ttl_s: float = 3600.0
    rotation_s: float = 3600.0
    rotate_after_messages: int = 2**31
    pending_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Threshold:
    """An alert threshold: ``count`` events (>= 1) within a sliding window of ``window_s`` seconds."""

    count: int
    window_s: float


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The site file's ``audit`` section: what is audited, alert thresholds, lockout back-off,
    checkpoints and where the audit key, the checkpoints and the spool live.

    ``skip_users_containing`` is Ubisense's ``[Automated]`` filter: records whose principal
    contains it are not audited. A failed-login lockout lasts ``lockout_base_s``, doubling
    for each repeated lockout up to ``lockout_max_s``; a subject with no lockout for
    ``lockout_forget_s`` starts again at the base. A checkpoint is signed every
    ``checkpoint_records`` records or ``checkpoint_s`` seconds, whichever comes first.
    The paths are absolute; ``None`` means ``<dataset>/audit/audit.key``,
    ``<dataset>/audit/checkpoints`` and ``<dataset>/spool``.
    """

    skip_users_containing: str | None = None
    failed_logins_per_user: Threshold = Threshold(5, 60.0)
    failed_logins_per_address: Threshold = Threshold(20, 60.0)
    denials_per_user: Threshold = Threshold(20, 60.0)
    rejected_per_address: Threshold = Threshold(50, 60.0)
    lockout_base_s: float = 30.0
    lockout_max_s: float = 3600.0
    lockout_forget_s: float = 3600.0
    checkpoint_records: int = 1000
    checkpoint_s: float = 10.0
    key_file: Path | None = None
    checkpoint_file: Path | None = None
    spool_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """A parsed site file. ``cells`` iterates in depth-first tree order; ``instances``
    in deployment order, then tree order. Queries raise ``ValueError`` for unknown names."""

    name: str
    source: Path
    dataset: Path
    imports: tuple[str, ...]
    core: CoreConfig
    hosts: Mapping[str, HostConfig]
    levels: tuple[str, ...]
    cells: Mapping[str, CellConfig]
    deployments: tuple[Deployment, ...]
    instances: tuple[InstancePlan, ...]
    security: SecurityConfig = SecurityConfig()
    run_dir: Path | None = None
    """Where the instances' ipc sockets live on every host (None: ``<dataset>/run``)."""
    audit: AuditConfig = AuditConfig()
    """The ``audit`` section: thresholds, lockout, checkpoints, key and spool paths."""

    def _cell(self, name: str) -> CellConfig:
        cell = self.cells.get(name)
        if cell is None:
            raise ValueError(f"unknown cell {name!r}")
        return cell

    def ancestors(self, cell: str) -> tuple[str, ...]:
        """The cell's parent, its parent's parent, ... up to ``Site``; not the cell itself."""
        out: list[str] = []
        parent = self._cell(cell).parent
        while parent is not None:
            out.append(parent)
            parent = self.cells[parent].parent
        return tuple(out)

    def is_within(self, cell: str, ancestor: str) -> bool:
        """True if ``cell`` is ``ancestor`` or lies below it."""
        self._cell(ancestor)
        return cell == ancestor or ancestor in self.ancestors(cell)

    def cells_at_level(self, level: str) -> tuple[str, ...]:
        """The cells of ``level``, in tree order."""
        if level not in self.levels:
            raise ValueError(f"unknown level {level!r}")
        return tuple(c.name for c in self.cells.values() if c.level == level)

    def instances_for_host(self, host: str) -> tuple[InstancePlan, ...]:
        """The instances the controller of ``host`` runs, in plan order."""
        if host not in self.hosts:
            raise ValueError(f"unknown host {host!r}")
        return tuple(i for i in self.instances if i.host == host)

    def instance(self, schema: str, cell: str) -> InstancePlan | None:
        """The plan for ``schema`` at ``cell``, or ``None`` if it is not deployed there."""
        self._cell(cell)
        for plan in self.instances:
            if plan.schema == schema and plan.cell == cell:
                return plan
        return None
