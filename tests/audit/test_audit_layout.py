"""The audit and review packages are their own room: no module name repeats one of the
labeling pipeline's, and none of their modules imports the labeling machinery.

Both rules are read from the source tree (file names and ``ast`` imports), so a module added
tomorrow is checked like today's.
"""

from __future__ import annotations

import re
from pathlib import Path

from support import REPO  # noqa: E402
from support.layout import imported_modules, module_names

PIPELINE = REPO / "pipeline"
ROOMS = ("audit", "review")
#: The labeling machinery of ``pipeline/`` that audits and reviews must not import.
MACHINERY = ("runner", "scheduler", "watchdog", "worker", "cpu_pool", "pool", "plan", "lease",
             "record", "outcome", "writer", "spool", "encode")


def forbidden_imports(path: Path, package: str) -> list[str]:
    """The labeling-machinery modules ``path`` imports, sorted."""
    banned = {f"pipeline.{name}" for name in MACHINERY}
    imports = imported_modules(path.read_text("utf-8"), package)
    return sorted(m for m in imports if any(m == b or m.startswith(b + ".") for b in banned))


def room_files() -> list[tuple[Path, str]]:
    """Every module of the audit and review packages with its dotted package."""
    files = []
    for room in ROOMS:
        for path in sorted((PIPELINE / room).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            package = ".".join(parts if path.stem == "__init__" else parts[:-1])
            files.append((path, package))
    return files


def test_the_checks_see_the_tree_and_catch_violations():
    assert {"runner", "writer", "progress", "config"} <= module_names(PIPELINE)
    assert len(room_files()) >= 20
    sample = ("from ..runner import run\nfrom pipeline import plan\nimport pipeline.pool\n"
              "def later():\n    from .. import writer\n"
              "from .sources import url_to_fs\nfrom pipeline.config import IOConfig\n")
    imports = imported_modules(sample, "pipeline.audit")
    assert {"pipeline.runner", "pipeline.plan", "pipeline.pool",
            "pipeline.writer", "pipeline.audit.sources", "pipeline.config"} <= imports
    assert imported_modules("from .. import lease\n", "pipeline.review") >= {"pipeline.lease"}


def test_no_audit_or_review_module_repeats_a_pipeline_module_name():
    pipeline_names = module_names(PIPELINE) - set(ROOMS)
    clashes = {room: sorted(module_names(PIPELINE / room) & pipeline_names) for room in ROOMS}
    assert clashes == {room: [] for room in ROOMS}, (
        f"rename these modules (they repeat a module of pipeline/): {clashes}")
    shared = module_names(PIPELINE / "audit") & module_names(PIPELINE / "review")
    assert not shared, f"audit and review both hold {sorted(shared)}"


def test_audit_and_review_never_import_the_labeling_machinery():
    offenders = {str(path.relative_to(REPO)): bad for path, package in room_files()
                 if (bad := forbidden_imports(path, package))}
    assert offenders == {}, f"audit/review import the labeling machinery: {offenders}"


def test_the_readme_audit_section_names_existing_modules():
    readme = (REPO / "README.md").read_text("utf-8")
    section = readme.split("## Auditing labels against ground truth", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+)\.py`", section))
    existing = module_names(PIPELINE / "audit") | module_names(PIPELINE / "review")
    assert len(named) >= 10 and named <= existing, sorted(named - existing)
