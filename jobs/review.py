"""Pick the labels the engine is least sure about and prepare them for review in Label Studio.

Usage::

    python jobs/review.py --labels OUTPUT --top K [--by uncertainty|disagreement|random]
        [--seed S] [--exclude-reviewed] --out DIR
        [--label-studio-url URL --project NAME_OR_ID] [--storage-options JSON|@FILE]

Writes ``DIR/tasks.json``, ``DIR/labeling_config.xml``, ``DIR/contact_sheet.html`` and adds the
batch to ``DIR/reviewed.json``. With ``--label-studio-url`` the tasks are imported into the
project (created when a title does not exist yet); the API token is read from the environment
variable ``LABEL_STUDIO_API_KEY``. Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs.help_text import field_defaults, given
from pipeline.audit import AuditError
from pipeline.config import storage_options_argument
from pipeline.review import LabelStudioError, ReviewConfig, ReviewError, run_review
from pipeline.review.ranking import RANKINGS
from schemas.uris import public_text

EXIT_INPUT_ERROR = 2
TOKEN_ENV = "LABEL_STUDIO_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; flags default to None and take :class:`ReviewConfig`'s
    defaults, which their help texts state."""
    d = field_defaults(ReviewConfig).__getitem__
    p = argparse.ArgumentParser(prog="review", description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", required=True, help="labeling output root (labels/ + run.json)")
    p.add_argument("--top", type=int, required=True, metavar="K", help="images to pick")
    p.add_argument("--by", choices=RANKINGS, help=f"ranking score (default: {d('by')})")
    p.add_argument("--seed", type=int,
                   help=f"tie-break and random seed (default: {d('seed')})")
    p.add_argument("--exclude-reviewed", action="store_true", default=None,
                   help="skip images listed in DIR/reviewed.json (default: off)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (any fsspec URI)")
    p.add_argument("--embed-images", action="store_true", default=None,
                   help="embed every image as a data URI (default: off: s3/gs objects by URL)")
    p.add_argument("--label-studio-url", metavar="URL",
                   help=f"import the tasks into this server (token from ${TOKEN_ENV}; "
                        "default: none, files only)")
    p.add_argument("--project", metavar="NAME_OR_ID",
                   help="Label Studio project title (created if missing) or id (default: none; "
                        "needed with --label-studio-url)")
    p.add_argument("--storage-options", type=storage_options_argument, metavar="JSON|@FILE",
                   help="JSON object of fsspec storage options for every URI, or @FILE "
                        f"naming a file that holds it (default: {d('storage_options')})")
    return p


def config_from_args(args: argparse.Namespace) -> ReviewConfig:
    """Parsed arguments -> :class:`ReviewConfig` (raises ``ReviewError``)."""
    token = os.environ.get(TOKEN_ENV) if args.label_studio_url else None
    if args.label_studio_url and not token:
        raise ReviewError(f"--label-studio-url needs the API token in ${TOKEN_ENV}")
    return ReviewConfig(args.labels, args.out, args.top, **given(dict(
        by=args.by, seed=args.seed, exclude_reviewed=args.exclude_reviewed,
        embed_images=args.embed_images, label_studio_url=args.label_studio_url,
        project=args.project, token=token, storage_options=args.storage_options)))


def main(argv: list[str] | None = None) -> int:
    """Run one review batch; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        outcome = run_review(config)
    except (ReviewError, LabelStudioError, AuditError, OSError) as error:
        print(f"review: error: {public_text(' '.join(str(error).split()))}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    for image_id, reason in outcome.missing_images.items():
        print(f"review: warning: no image for {image_id}: {reason}", file=sys.stderr)
    print(f"selected {len(outcome.selected)} images by {config.by}; files: "
          f"{', '.join(outcome.files)}")
    if outcome.project is not None:
        print(f"imported {outcome.imported} tasks into Label Studio project "
              f"{outcome.project.get('id')} ({outcome.project.get('title')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
