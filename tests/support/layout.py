"""Reading the source tree's layout: module names of a folder, modules a source imports."""

from __future__ import annotations

import ast
from pathlib import Path


def module_names(folder: Path) -> set[str]:
    """Names of the modules and subpackages directly in ``folder`` (``__init__`` excluded)."""
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return names | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module ``source`` imports (top level and inside functions).

    Args:
        source: Python source of a module of ``package``.
        package: dotted package of that module (resolves relative imports).

    Returns:
        For ``import a.b`` the name ``a.b``; for ``from a import b`` both ``a`` and ``a.b``
        (``b`` may be a module).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found
