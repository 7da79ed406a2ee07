"""Quality audits of labels against held-out ground truth (mmseg metric conventions).

Entry points: :func:`run_audit` with an :class:`AuditConfig` (:mod:`.auditing`,
``jobs/audit.py``) and the paper's benchmarks (:mod:`.benchmarks`, ``jobs/evaluate.py``),
which reuse the building blocks (:class:`Evaluator`, mappings, reports).
"""

from .auditing import AuditConfig, AuditOutcome, run_audit
from .categories import CategoryMapping, GtCategory, build_mapping, identity_mapping
from .errors import AuditError
from .evaluator import EvaluationResult, Evaluator
from .report import build_metrics
from .report_files import write_report
from .worst import ImageRef

__all__ = [
    "AuditConfig", "AuditError", "AuditOutcome", "CategoryMapping", "EvaluationResult",
    "Evaluator", "GtCategory", "ImageRef", "build_mapping", "build_metrics", "identity_mapping",
    "run_audit", "write_report",
]
