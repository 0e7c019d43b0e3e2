"""The public surface: the error tree is whole, ``__all__`` is true, the library is typed."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ubicore.errors as errors

ROOT = Path(__file__).resolve().parents[1]


def test_errors_all_lists_every_public_error_and_only_those() -> None:
    public = {n for n, v in vars(errors).items() if inspect.isclass(v) and issubclass(v, errors.UbiError)}
    assert public == set(errors.__all__) - {"remote_error_from_wire"}
    for name in errors.__all__:
        assert hasattr(errors, name)


def test_every_error_is_drawn_in_the_tree_and_says_when_it_is_raised() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        obj = getattr(errors, name)
        if inspect.isclass(obj):
            assert name in doc, f"{name} is missing from the tree in errors.py's docstring"
            assert obj.__doc__, f"{name} has no docstring"


def test_every_remote_error_code_round_trips() -> None:
    for cls in errors.RemoteError.__subclasses__():
        err = errors.remote_error_from_wire(cls.code, "m", {"k": 1})
        assert type(err) is cls and err.to_wire() == {"code": cls.code, "message": "m", "detail": {"k": 1}}
    assert isinstance(errors.CallTimeout("x"), TimeoutError)
    assert type(errors.remote_error_from_wire("no_such_code", "m", {})) is errors.RemoteFailure


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists(),
                    reason="mypy is installed with the test extras")
def test_library_is_typed_strictly() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "ubicore", "services", "tools", "credentials"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:]


def test_only_the_transport_imports_zmq() -> None:
    import ast

    offenders = []
    for folder in ("ubicore", "services", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent.name == "transport":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n == "zmq" or n.startswith("zmq.") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
