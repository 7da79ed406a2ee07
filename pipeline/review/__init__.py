"""The review loop: rank the least certain labels, hand them to Label Studio, read them back.

:mod:`.ranking` scores rows and picks the top K; :mod:`.brush` converts masks to and from
Label Studio's brush RLE; :mod:`.tasks` builds tasks and the labeling config; :mod:`.images`
fetches the photos; :mod:`.sheet` renders the contact sheet; :mod:`.client` talks to the
server; :mod:`.session` composes them. Corrections come back through
:mod:`pipeline.audit.gt_labelstudio`.
"""

from .brush import BrushError, decode_brush, encode_brush
from .client import LabelStudioClient, LabelStudioError
from .session import ReviewConfig, ReviewError, ReviewOutcome, run_review

__all__ = ["BrushError", "LabelStudioClient", "LabelStudioError", "ReviewConfig",
           "ReviewError", "ReviewOutcome", "decode_brush", "encode_brush", "run_review"]
