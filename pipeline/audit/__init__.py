"""Quality audits of labels against held-out ground truth (mmseg metric conventions).

Entry points: :func:`run_audit` with an :class:`AuditConfig` (``jobs/audit.py``), and the
building blocks reused by the benchmark protocol (:class:`Evaluator`, mappings, reports).
"""

from .categories import CategoryMapping, GtCategory, build_mapping, identity_mapping
from .errors import AuditError
from .evaluator import EvaluationResult, Evaluator
from .report import build_metrics
from .runner import AuditConfig, AuditOutcome, run_audit
from .worst import ImageRef
from .writer import write_report

__all__ = [
    "AuditConfig", "AuditError", "AuditOutcome", "CategoryMapping", "EvaluationResult",
    "Evaluator", "GtCategory", "ImageRef", "build_mapping", "build_metrics", "identity_mapping",
    "run_audit", "write_report",
]
