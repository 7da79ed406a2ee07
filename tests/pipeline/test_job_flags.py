"""Flags of the label, export, export_coco and review jobs: every optional flag defaults to None
and takes its default from the config dataclass, every help text states the default, and
``--storage-options`` is parsed by one function (inline JSON or @FILE) in every job."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from jobs import export, export_coco, label, review
from jobs.help_text import field_defaults
from pipeline.config import (
    ComputeConfig,
    EngineSpec,
    IOConfig,
    OutputPolicy,
    storage_options_argument,
)
from pipeline.review import ReviewConfig

REQUIRED = {
    label: ["--input", "in", "--output", "out"],
    export: ["--labels", "l", "--format", "png", "--out", "o"],
    export_coco: ["--labels", "l", "--out", "o.json"],
    review: ["--labels", "l", "--top", "3", "--out", "o"],
}


def _optional(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not a.required
            and a.dest != "help"]


@pytest.mark.parametrize("job", list(REQUIRED), ids=lambda j: j.__name__)
def test_every_optional_flag_defaults_to_none_and_its_help_states_the_default(job):
    parser = job.build_parser()
    optional = _optional(parser)
    assert optional
    for action in optional:
        assert action.default is None, action.option_strings
        assert "default" in (action.help or ""), action.option_strings
    args = parser.parse_args(REQUIRED[job])
    assert all(getattr(args, a.dest) is None for a in optional)


@pytest.mark.parametrize("job", list(REQUIRED), ids=lambda j: j.__name__)
def test_every_job_parses_storage_options_with_the_one_rule(job, tmp_path):
    [action] = [a for a in job.build_parser()._actions if "--storage-options" in a.option_strings]
    assert action.type is storage_options_argument
    secret = tmp_path / "options.json"
    secret.write_text(json.dumps({"key": "k", "secret": "s"}))
    parser = job.build_parser()
    inline = parser.parse_args([*REQUIRED[job], "--storage-options", '{"anon": true}'])
    from_file = parser.parse_args([*REQUIRED[job], "--storage-options", f"@{secret}"])
    assert inline.storage_options == {"anon": True}
    assert from_file.storage_options == {"key": "k", "secret": "s"}


def test_label_job_without_flags_is_the_dataclass_defaults(vocab_file):
    args = label.build_parser().parse_args([*REQUIRED[label], "--vocab", str(vocab_file)])
    job = label.job_from_args(args)
    cwd = os.getcwd()
    assert job.io == IOConfig(f"{cwd}/in", f"{cwd}/out")
    assert job.compute == ComputeConfig() and job.policy == OutputPolicy()
    assert job.engine == EngineSpec(job.engine.config)
    assert job.engine.stub is None  # --engine defaults to the real engine
    help_text = " ".join(label.build_parser().format_help().split())
    assert f"(default: {field_defaults(OutputPolicy)['wait_for_lease_s']:g}:" in help_text
    assert f"(default: {field_defaults(EngineSpec)['device']}:" in help_text


def test_review_job_without_flags_is_the_dataclass_defaults():
    config = review.config_from_args(review.build_parser().parse_args(REQUIRED[review]))
    assert config == ReviewConfig("l", "o", 3)
    help_text = " ".join(review.build_parser().format_help().split())
    assert f"(default: {field_defaults(ReviewConfig)['by']})" in help_text
    assert f"(default: {field_defaults(ReviewConfig)['seed']})" in help_text
    chosen = review.config_from_args(review.build_parser().parse_args(
        [*REQUIRED[review], "--by", "random", "--seed", "7", "--embed-images"]))
    assert (chosen.by, chosen.seed, chosen.embed_images) == ("random", 7, True)
