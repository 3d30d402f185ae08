"""The code a stage runs: its module and every project module it imports, found from the source.

Imports are read with ``ast`` (top-level and inside functions alike), never by importing, so the
closure is cheap, has no side effects and sees lazy imports too. Only modules of the project's own
packages count; third-party code is pinned by the environment, not by the stage graph.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("pipeline", "models")


def module_path(name: str) -> Path | None:
    """The file that defines module ``name`` in this checkout, or None when it is not project code."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def direct_imports(module: str) -> set[str]:
    """Project modules named by ``module``'s import statements, plus the packages that contain them."""
    path = module_path(module)
    if path is None:
        return set()
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    found = {n for n in names if module_path(n) is not None}
    return found | {p for n in found for p in _parents(n)}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def closure(module: str) -> tuple[str, ...]:
    """Every project module ``module`` runs (itself and its packages included), sorted."""
    seen: set[str] = set()
    todo = [module, *_parents(module)]
    while todo:
        name = todo.pop()
        if name in seen or module_path(name) is None:
            continue
        seen.add(name)
        todo.extend(direct_imports(name) - seen)
    return tuple(sorted(seen))


def closure_files(module: str) -> list[str]:
    """The closure as paths relative to the repository root (what ``dvc.yaml`` lists)."""
    return sorted(module_path(name).relative_to(ROOT).as_posix() for name in closure(module))  # type: ignore[union-attr]


def code_digest(module: str) -> str:
    """SHA-256 (16 hex digits) of the closure's paths and contents: changes when any file it runs changes."""
    h = hashlib.sha256()
    for rel in closure_files(module):
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]
