"""The packages' import rules, as the README's "Layout" section states them.

Read from the source tree (``ast`` imports, top level and inside functions), so a module added
tomorrow is held to the same rules: ``schemas`` imports no other package of the project;
``cass_engine`` imports only ``schemas.uris``; the labeling pipeline never imports the audit or
review rooms; nothing but ``jobs`` and ``bench`` imports ``jobs``; nothing imports ``bench``
or the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import REPO  # noqa: E402
from support.layout import imported_modules

PACKAGES = ("cass_engine", "pipeline", "jobs", "schemas")
ROOMS = ("pipeline.audit", "pipeline.review")


def project_imports(path: Path) -> set[str]:
    """Modules of the project that the module at ``path`` imports."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])
    roots = (*PACKAGES, "bench", "tests", "support", "conftest")
    return {m for m in imported_modules(path.read_text("utf-8"), package or parts[-1])
            if m.split(".")[0] in roots}


def module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violation(module: str, imported: str) -> str | None:
    """Why ``module`` may not import ``imported``, or None when the rule allows it."""
    if imported.split(".")[0] in ("bench", "tests", "support", "conftest"):
        return "imports the benchmarks or the tests"
    if in_package(imported, "jobs") and not in_package(module, "jobs"):
        return "imports an entry point (jobs)"
    if in_package(module, "schemas") and not in_package(imported, "schemas"):
        return "the output contract imports another package"
    if in_package(module, "cass_engine") and not (
            in_package(imported, "cass_engine") or imported == "schemas"
            or in_package(imported, "schemas.uris")):
        return "the engine imports more than schemas.uris"
    labeling = in_package(module, "pipeline") and not any(in_package(module, r) for r in ROOMS)
    if labeling and any(in_package(imported, r) for r in ROOMS):
        return "the labeling pipeline imports the audit or review room"
    return None


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_every_package_keeps_to_its_layer():
    files = source_files()
    assert len(files) > 60 and any(p.name == "runner.py" for p in files)  # the scan sees the tree
    offenders = sorted(f"{module_of(p)} -> {m}: {why}" for p in files
                       for m in project_imports(p) if (why := violation(module_of(p), m)))
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(("module", "imported", "broken"), [
    ("schemas.io", "pipeline.config", True),
    ("schemas.io", "schemas.uris", False),
    ("cass_engine.weights", "schemas.uris", False),
    ("cass_engine.weights", "schemas.uris.public_uri", False),
    ("cass_engine.weights", "schemas.labels", True),
    ("cass_engine.images", "pipeline.decode", True),
    ("pipeline.exports", "pipeline.audit.calibration", True),
    ("pipeline.audit.auditing", "pipeline.progress", False),
    ("pipeline.review.session", "jobs.review", True),
    ("jobs.label", "pipeline.runner", False),
    ("pipeline.runner", "bench.pipeline_bench", True),
])
def test_the_rules_catch_what_they_forbid(module, imported, broken):
    assert (violation(module, imported) is not None) is broken


def test_the_readme_layout_names_every_package_and_module_folder():
    readme = (REPO / "README.md").read_text("utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for folder in ("cass_engine/", "pipeline/", "pipeline/audit/", "pipeline/review/", "jobs/",
                   "schemas/", "tests/", "bench/"):
        assert f"`{folder}`" in section, folder
