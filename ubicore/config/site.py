"""The site file: YAML parsed once into frozen site, host, cell and deployment objects.

A site file names the hosts, the tree of cells, where the core runs, the dataset path and
which schemas are deployed where::

    site: demo                      # site name, [A-Za-z0-9_.-]+
    dataset: ../dataset/demo        # relative paths are relative to the site file's directory
    run_dir: /srv/ubicore-demo-run  # optional: where the instances' ipc sockets live (default <dataset>/run)
    imports: [mypkg.schemas]        # optional: dotted names of modules declaring extra schemas
    core:
      host: host-a                  # must name a host
      rpc_port: 7700                # naming registry RPC port on the core host (1..65535)
      event_port: 7701              # naming registry event channel port (not rpc_port)
    hosts:
      host-a: {address: 127.0.0.1}  # an IPv4/IPv6 address, or a DNS host name
      host-b: {address: 127.0.0.2}
    levels: [site, building, zone]  # optional; if given, every cell's level is one of these
    cells:                          # exactly one root, named "Site"
      Site:
        level: site                 # required
        host: host-a                # optional, defaults to the parent's; required at the root
        children:                   # optional mapping of child cells, same shape
          Building-1:
            level: building
            children:
              Zone-A: {level: zone}
              Zone-B: {level: zone, host: host-b}
    security:                       # optional; every key optional
      session_ttl_s: 3600           # a session lives this long, then clients log in again
      rotation_s: 3600              # full channels get a new group key this often
      rotate_after_messages: 2147483648   # ... and after this many events (< 2^32)
    audit:                          # optional; every key optional (defaults shown)
      skip_users_containing: "[Automated]"   # optional: principals containing this are not audited
      failed_logins_per_user: {count: 5, window_s: 60}      # alert and lock the user out
      failed_logins_per_address: {count: 20, window_s: 60}  # alert and lock the address out
      denials_per_user: {count: 20, window_s: 60}           # alert only
      rejected_per_address: {count: 50, window_s: 60}       # alert only (tampered, replayed, malformed)
      lockout: {base_s: 30, max_s: 3600, forget_s: 3600}    # doubling back-off; forget after forget_s
      checkpoint: {records: 1000, seconds: 10}              # sign a checkpoint, whichever first
      key_file: /srv/ubi-audit/audit.key        # default <dataset>/audit/audit.key
      checkpoint_file: /srv/ubi-audit/checkpoints   # default <dataset>/audit/checkpoints
      spool_dir: /srv/ubi-spool                 # default <dataset>/spool
    deployments:                    # optional list
      - schema: ULocationSystem::ConfigurationUpdate   # Module::Schema
        level: site                 # exactly one of level / cell
        protection: update          # optional: open | update | full
        options: {}                 # optional: str -> scalar, list or mapping
      - schema: ULocation::Positions
        level: zone
        options: {rate_hz: 10, tags: 8}

Names (site, hosts, cells, levels) match ``[A-Za-z0-9_.-]+``; cell names are unique
across the whole tree. A deployment by level yields one instance per cell of that level,
a deployment by cell one instance at that cell; the same schema twice at one cell is an
error. Unknown keys, duplicate keys, wrong types and missing keys are errors.

``run_dir`` is the directory of the instances' local (``ipc://``) sockets on every host,
resolved like ``dataset`` and at most 90 characters once absolute (a Unix socket path
must stay under 108 bytes). The instances make it (mode 0711) if it is missing, never
remove it, and refuse it if it is a symlink, another account's, or writable by group or
others. The default, ``<dataset>/run``, sits in the dataset that ``ubi site init`` makes
private (0700), so only the site's own account reaches it; to let OS users of other
accounts log in locally, name a directory they can traverse, owned by the site's
account with mode 0711 (``mkdir DIR; chown SITE-ACCOUNT: DIR; chmod 0711 DIR`` as root;
docs/operators-guide.md, "OS users"; :mod:`ubicore.localipc`).

In ``audit``, a threshold's ``count`` is an integer 1..100000 and every duration is
seconds, 0 < s < 10^9; ``lockout.max_s`` is at least ``lockout.base_s``; ``checkpoint.records``
is an integer 1..10^9; ``skip_users_containing`` is a non-empty string. ``key_file``,
``checkpoint_file`` and ``spool_dir`` resolve like ``dataset``; the key file and the
checkpoint file must differ (the key is kept apart from what it signs).

Every problem is a :class:`~ubicore.errors.ConfigError` naming the file as given and
the key path (``hosts.host-b.address``, ``deployments[1].schema``; ``""`` for the whole
document). No ``yaml``, ``OSError`` or ``KeyError`` escapes :func:`load_site` or
:func:`parse_site`. The parsed :class:`SiteConfig` is immutable: dataclasses are frozen,
mappings are read-only proxies, sequences are tuples.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml  # PyYAML ships no stubs; only safe_load is used

from ubicore.config.model import (
    PROTECTIONS,
    ROOT_CELL,
    AuditConfig,
    CellConfig,
    CoreConfig,
    Deployment,
    HostConfig,
    InstancePlan,
    SecurityConfig,
    SiteConfig,
    Threshold,
)
from ubicore.errors import ConfigError

MAX_RUN_DIR = 90
"""A socket path (run_dir + "/" + 12 hex digits + ".ipc") must stay under 108 bytes."""

__all__ = ["PROTECTIONS", "ROOT_CELL", "CellConfig", "CoreConfig", "Deployment", "HostConfig",
           "InstancePlan", "SiteConfig", "load_site", "parse_site"]

MAX_OPTION_DEPTH = 32
MAX_THRESHOLD_COUNT = 100_000
"""A threshold's window keeps up to ``count`` timestamps per subject: keep it modest."""
MAX_SECONDS = 10**9

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SCHEMA_RE = re.compile(rf"{_IDENT}::{_IDENT}")
_MODULE_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def load_site(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and parse the site file at ``path``. Raises ``ConfigError``."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(file, "", f"cannot read: {reason}") from exc
    return parse_site(text, file)


def parse_site(text: str, source: str | Path) -> SiteConfig:
    """Parse site-file ``text``; ``source`` names it in errors and anchors ``dataset``."""
    return _Parser(str(source)).site(_load_yaml(text, str(source)))


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # yaml is untyped
    """``SafeLoader`` that refuses a key repeated in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        parts = (getattr(exc, "context", None), getattr(exc, "problem", None))
        what = " ".join(p for p in parts if p) or str(exc)
        raise ConfigError(file, "", f"invalid YAML: {what}{where}") from exc
    except RecursionError as exc:
        raise ConfigError(file, "", "invalid YAML: nested too deeply") from exc
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2020-13-45
        raise ConfigError(file, "", f"invalid YAML value: {exc}") from exc


def _kind(value: object) -> str:
    kinds = {type(None): "null", bool: "boolean", int: "integer", float: "float",
             str: "string", list: "list", dict: "mapping"}
    return kinds.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    return (len(text) <= 253 and all(_LABEL_RE.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())


class _Parser:
    """Walks the loaded document once; the first problem found raises ``ConfigError``."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, problem: str) -> NoReturn:
        raise ConfigError(self.file, path, problem)

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {_kind(key)} {key!r}")
        return value

    def record(self, value: Any, path: str, required: tuple[str, ...],
               optional: tuple[str, ...] = ()) -> dict[str, Any]:
        data = self.mapping(value, path)
        for key in data:
            if key not in required and key not in optional:
                allowed = ", ".join(required + optional)
                self.fail(_join(path, key), f"unknown key (expected one of: {allowed})")
        for key in required:
            if key not in data:
                self.fail(_join(path, key), "missing required key")
        return data

    def sequence(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind(value)}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_kind(value)}")
        return value

    def name(self, value: Any, path: str, what: str) -> str:
        text = self.string(value, path)
        if not _NAME_RE.fullmatch(text):
            self.fail(path, f"invalid {what} name {text!r}: use [A-Za-z0-9_.-]+")
        return text

    def port(self, value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(path, f"expected an integer, got {_kind(value)}")
        if not 1 <= value <= 65535:
            self.fail(path, f"port {value} out of range 1..65535")
        return value

    def freeze(self, value: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_OPTION_DEPTH:
            self.fail(path, f"nested deeper than {MAX_OPTION_DEPTH} levels")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return tuple(self.freeze(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
        if isinstance(value, dict):
            data = self.mapping(value, path)
            return MappingProxyType(
                {k: self.freeze(v, _join(path, k), depth + 1) for k, v in data.items()})
        self.fail(path, f"expected a scalar, list or mapping, got {_kind(value)}")

    def site(self, doc: Any) -> SiteConfig:
        top = self.record(doc, "", ("site", "dataset", "core", "hosts", "cells"),
                          ("imports", "levels", "deployments", "security", "run_dir", "audit"))
        name = self.name(top["site"], "site", "site")
        dataset = self.string(top["dataset"], "dataset")
        if not dataset or "\0" in dataset:
            self.fail("dataset", "expected a non-empty path")
        imports = self.unique_list(top.get("imports", []), "imports", "module", _MODULE_RE, True)
        hosts = self.hosts(top["hosts"])
        core = self.core(top["core"], hosts)
        declared = (self.unique_list(top["levels"], "levels", "level", _NAME_RE, False)
                    if "levels" in top else None)
        cells = self.cells(top["cells"], hosts, declared)
        levels = declared or tuple(dict.fromkeys(c.level for c in cells.values()))
        deployments, instances = self.deployments(top.get("deployments", []), cells, levels)
        security = self.security(top.get("security", {}))
        base = Path(self.file).parent
        audit = self.audit(top.get("audit", {}), base)
        run_dir = None
        if "run_dir" in top:
            given = self.string(top["run_dir"], "run_dir")
            if not given or "\0" in given:
                self.fail("run_dir", "expected a non-empty path")
            run_dir = Path(os.path.abspath(base / given))
            if len(str(run_dir)) > MAX_RUN_DIR:
                self.fail("run_dir", f"too long for Unix socket paths (at most {MAX_RUN_DIR} characters)")
        return SiteConfig(
            name=name, source=Path(self.file),
            dataset=Path(os.path.abspath(base / dataset)), imports=imports, core=core,
            hosts=MappingProxyType(hosts), levels=levels, cells=MappingProxyType(cells),
            deployments=deployments, instances=instances, security=security, run_dir=run_dir,
            audit=audit)

    def security(self, value: Any) -> SecurityConfig:
        keys = ("session_ttl_s", "rotation_s", "rotate_after_messages")
        data = self.record(value, "security", (), keys)
        out: dict[str, Any] = {}
        for key in ("session_ttl_s", "rotation_s"):
            if key in data:
                v = data[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 10**9:
                    self.fail(f"security.{key}", f"expected seconds > 0, got {v!r}")
                out[key] = float(v)
        if "rotate_after_messages" in data:
            v = data["rotate_after_messages"]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**32:
                self.fail("security.rotate_after_messages", f"expected an integer 1..2^32-1, got {v!r}")
            out["rotate_after_messages"] = v
        return SecurityConfig(**out)

    def seconds(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < MAX_SECONDS:
            self.fail(path, f"expected seconds > 0, got {value!r}")
        return float(value)

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, f"expected an integer {low}..{high}, got {value!r}")
        return value

    def path(self, value: Any, path: str, base: Path) -> Path:
        given = self.string(value, path)
        if not given or "\0" in given:
            self.fail(path, "expected a non-empty path")
        return Path(os.path.abspath(base / given))

    def threshold(self, value: Any, path: str, default: Threshold) -> Threshold:
        data = self.record(value, path, (), ("count", "window_s"))
        count = (self.integer(data["count"], f"{path}.count", 1, MAX_THRESHOLD_COUNT)
                 if "count" in data else default.count)
        window_s = (self.seconds(data["window_s"], f"{path}.window_s")
                    if "window_s" in data else default.window_s)
        return Threshold(count, window_s)

    def audit(self, value: Any, base: Path) -> AuditConfig:
        thresholds = ("failed_logins_per_user", "failed_logins_per_address", "denials_per_user",
                      "rejected_per_address")
        paths = ("key_file", "checkpoint_file", "spool_dir")
        data = self.record(value, "audit", (),
                           ("skip_users_containing", *thresholds, "lockout", "checkpoint", *paths))
        defaults = AuditConfig()
        out: dict[str, Any] = {}
        if "skip_users_containing" in data:
            skip = self.string(data["skip_users_containing"], "audit.skip_users_containing")
            if not skip:
                self.fail("audit.skip_users_containing", "expected a non-empty string")
            out["skip_users_containing"] = skip
        for key in thresholds:
            if key in data:
                out[key] = self.threshold(data[key], f"audit.{key}", getattr(defaults, key))
        lockout = self.record(data.get("lockout", {}), "audit.lockout", (),
                              ("base_s", "max_s", "forget_s"))
        for key in ("base_s", "max_s", "forget_s"):
            if key in lockout:
                out[f"lockout_{key}"] = self.seconds(lockout[key], f"audit.lockout.{key}")
        base_s = out.get("lockout_base_s", defaults.lockout_base_s)
        max_s = out.get("lockout_max_s", defaults.lockout_max_s)
        if max_s < base_s:
            key = "max_s" if "max_s" in lockout else "base_s"
            self.fail(f"audit.lockout.{key}",
                      f"lockout.max_s ({max_s:g}) must be at least lockout.base_s ({base_s:g})")
        checkpoint = self.record(data.get("checkpoint", {}), "audit.checkpoint", (),
                                 ("records", "seconds"))
        if "records" in checkpoint:
            out["checkpoint_records"] = self.integer(checkpoint["records"],
                                                     "audit.checkpoint.records", 1, MAX_SECONDS)
        if "seconds" in checkpoint:
            out["checkpoint_s"] = self.seconds(checkpoint["seconds"], "audit.checkpoint.seconds")
        for key in paths:
            if key in data:
                out[key] = self.path(data[key], f"audit.{key}", base)
        if "key_file" in out and out["key_file"] == out.get("checkpoint_file"):
            self.fail("audit.checkpoint_file", "must not be the key file (keep the key apart)")
        return AuditConfig(**out)

    def unique_list(self, value: Any, path: str, what: str, pattern: re.Pattern[str],
                    allow_empty: bool) -> tuple[str, ...]:
        out: list[str] = []
        for i, item in enumerate(self.sequence(value, path)):
            text = self.string(item, f"{path}[{i}]")
            if not pattern.fullmatch(text):
                self.fail(f"{path}[{i}]", f"invalid {what} name {text!r}")
            if text in out:
                self.fail(f"{path}[{i}]", f"duplicate {what} {text!r}")
            out.append(text)
        if not out and not allow_empty:
            self.fail(path, f"expected at least one {what}")
        return tuple(out)

    def hosts(self, value: Any) -> dict[str, HostConfig]:
        hosts: dict[str, HostConfig] = {}
        for key, spec in self.mapping(value, "hosts").items():
            path = _join("hosts", key)
            self.name(key, path, "host")
            address = self.string(self.record(spec, path, ("address",))["address"],
                                  f"{path}.address")
            if not _is_address(address):
                self.fail(f"{path}.address", f"not an IP address or host name: {address!r}")
            hosts[key] = HostConfig(key, address)
        if not hosts:
            self.fail("hosts", "expected at least one host")
        return hosts

    def known_host(self, value: Any, path: str, hosts: Mapping[str, HostConfig]) -> str:
        host = self.string(value, path)
        if host not in hosts:
            self.fail(path, f"unknown host {host!r} (hosts: {', '.join(hosts)})")
        return host

    def core(self, value: Any, hosts: Mapping[str, HostConfig]) -> CoreConfig:
        data = self.record(value, "core", ("host", "rpc_port", "event_port"))
        host = self.known_host(data["host"], "core.host", hosts)
        rpc_port = self.port(data["rpc_port"], "core.rpc_port")
        event_port = self.port(data["event_port"], "core.event_port")
        if event_port == rpc_port:
            self.fail("core.event_port", f"port {event_port} is already core.rpc_port")
        return CoreConfig(host, hosts[host].address, rpc_port, event_port)

    def cells(self, value: Any, hosts: Mapping[str, HostConfig],
              levels: tuple[str, ...] | None) -> dict[str, CellConfig]:
        roots = self.mapping(value, "cells")
        if len(roots) != 1:
            found = ", ".join(roots) or "none"
            self.fail("cells", f"expected exactly one root cell {ROOT_CELL!r}, got {found}")
        root = next(iter(roots))
        if root != ROOT_CELL:
            self.fail(_join("cells", root), f"the root cell must be named {ROOT_CELL!r}")
        cells: dict[str, CellConfig] = {}
        where: dict[str, str] = {}
        # Depth-first, children in file order: (name, spec, parent, parent's host, path).
        stack: list[tuple[str, Any, str | None, str | None, str]] = [
            (root, roots[root], None, None, _join("cells", root))]
        while stack:
            name, spec, parent, parent_host, path = stack.pop()
            self.name(name, path, "cell")
            if name in where:
                self.fail(path, f"duplicate cell name {name!r} (first at {where[name]})")
            where[name] = path
            data = self.record(spec, path, ("level",), ("host", "children"))
            level = self.name(data["level"], f"{path}.level", "level")
            if levels is not None and level not in levels:
                self.fail(f"{path}.level", f"unknown level {level!r} (levels: {', '.join(levels)})")
            if "host" in data:
                host = self.known_host(data["host"], f"{path}.host", hosts)
            elif parent_host is None:
                self.fail(f"{path}.host", "missing required key")
            else:
                host = parent_host
            children = self.mapping(data.get("children", {}), f"{path}.children")
            cells[name] = CellConfig(name, level, host, parent, tuple(children))
            stack.extend((child, children[child], name, host, f"{path}.children.{child}")
                         for child in reversed(tuple(children)))
        return cells

    def deployments(self, value: Any, cells: Mapping[str, CellConfig],
                    levels: tuple[str, ...]) -> tuple[tuple[Deployment, ...],
                                                      tuple[InstancePlan, ...]]:
        deployments: list[Deployment] = []
        instances: list[InstancePlan] = []
        first: dict[tuple[str, str], str] = {}
        for i, item in enumerate(self.sequence(value, "deployments")):
            path = f"deployments[{i}]"
            data = self.record(item, path, ("schema",), ("level", "cell", "protection", "options"))
            schema = self.string(data["schema"], f"{path}.schema")
            if not _SCHEMA_RE.fullmatch(schema):
                self.fail(f"{path}.schema", f"invalid schema name {schema!r}: use Module::Schema")
            if ("level" in data) == ("cell" in data):
                self.fail(path, "give exactly one of level or cell")
            level: str | None = None
            cell: str | None = None
            if "level" in data:
                level = self.name(data["level"], f"{path}.level", "level")
                if level not in levels:
                    self.fail(f"{path}.level", f"unknown level {level!r} (levels: {', '.join(levels)})")
                targets = tuple(c.name for c in cells.values() if c.level == level)
                if not targets:
                    self.fail(f"{path}.level", f"no cell has level {level!r}")
            else:
                cell = self.string(data["cell"], f"{path}.cell")
                if cell not in cells:
                    self.fail(f"{path}.cell", f"unknown cell {cell!r}")
                targets = (cell,)
            protection: str | None = None
            if "protection" in data:
                protection = self.string(data["protection"], f"{path}.protection")
                if protection not in PROTECTIONS:
                    self.fail(f"{path}.protection",
                              f"expected one of {', '.join(PROTECTIONS)}, got {protection!r}")
            options = self.freeze(self.mapping(data.get("options", {}), f"{path}.options"),
                                  f"{path}.options")
            deployments.append(Deployment(schema, level, cell, protection, options))
            for target in targets:
                if (schema, target) in first:
                    self.fail(path, f"{schema} is already deployed at cell {target!r} "
                                    f"by {first[schema, target]}")
                first[schema, target] = path
                instances.append(
                    InstancePlan(schema, target, cells[target].host, protection, options))
        return tuple(deployments), tuple(instances)
