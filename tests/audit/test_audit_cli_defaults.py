"""jobs/audit.py and jobs/evaluate.py take every default from their config dataclass: flags
left out parse to None, the config then holds the dataclass's defaults, and each help text
states that default."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from jobs import audit, evaluate
from jobs.help_text import field_defaults
from pipeline.audit import AuditConfig, AuditError
from pipeline.audit.benchmarks import BENCHMARKS, EvaluateConfig

AUDIT_REQUIRED = ["--labels", "L", "--ground-truth", "G", "--report", "R"]
EVALUATE_REQUIRED = ["--benchmark", "voc21", "--data-root", "D"]
JOBS = [(audit.build_parser, AuditConfig, AUDIT_REQUIRED),
        (evaluate.build_parser, EvaluateConfig, EVALUATE_REQUIRED)]


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize(("build", "config_type", "required"), JOBS)
def test_flags_left_out_parse_to_none_and_name_config_fields(build, config_type, required):
    parser = build()
    args = vars(parser.parse_args(required))
    given = {a.dest for a in _options(parser) if set(a.option_strings) & set(required)}
    assert {name for name, value in args.items() if value is not None} == given
    assert set(args) <= {f.name for f in dataclasses.fields(config_type)}


def test_audit_without_options_is_the_dataclass_default():
    config = audit.config_from_args(audit.build_parser().parse_args(AUDIT_REQUIRED))
    assert config == AuditConfig(labels="L", ground_truth="G", report_dir="R")


def test_audit_options_reach_the_config():
    args = audit.build_parser().parse_args([
        *AUDIT_REQUIRED, "--no-progress", "--coco-ap", "--reduce-zero-label", "--worst-k", "0",
        "--mask-suffix", "_m.png", "--coco-unlabeled", "ignore", "--storage-options", '{"a": 1}'])
    config = audit.config_from_args(args)
    assert (config.progress, config.coco_ap, config.reduce_zero_label) == (False, True, True)
    assert (config.worst_k, config.mask_suffix, config.coco_unlabeled) == (0, "_m.png", "ignore")
    assert config.storage_options == {"a": 1}


def test_evaluate_without_options_is_the_dataclass_default():
    config = evaluate.config_from_args(evaluate.build_parser().parse_args(EVALUATE_REQUIRED))
    assert config == EvaluateConfig(benchmark="voc21", data_root="D")
    args = evaluate.build_parser().parse_args([*EVALUATE_REQUIRED, "--no-progress", "--report",
                                               "out", "--batch-size", "3", "--limit", "2"])
    config = evaluate.config_from_args(args)
    assert (config.progress, config.report_dir, config.batch_size, config.limit) == (
        False, "out", 3, 2)


@pytest.mark.parametrize("bad", [dict(limit=0), dict(batch_size=0), dict(worst_k=-1),
                                 dict(benchmark="voc99"), dict(random_weights=0, clip_weights="c"),
                                 dict(random_weights=0, dino_weights="d")])
def test_evaluate_config_refuses_bad_values(bad):
    with pytest.raises(AuditError):
        EvaluateConfig(**{"benchmark": "voc21", "data_root": "D", **bad})


@pytest.mark.parametrize(("build", "config_type", "required"), JOBS)
def test_every_optional_flag_states_its_default(build, config_type, required):
    defaults = field_defaults(config_type)
    for action in _options(build()):
        if action.required or "required unless" in (action.help or ""):
            continue
        assert "(default: " in action.help, action.option_strings
        value = defaults[action.dest]
        if value is not None and not isinstance(value, (bool, dict)):
            assert f"(default: {value})" in action.help, action.option_strings


def test_evaluate_benchmark_help_lists_every_choice():
    action = next(a for a in evaluate.build_parser()._actions if a.dest == "benchmark")
    assert list(action.choices) == list(BENCHMARKS)
    assert all(name in action.help for name in BENCHMARKS)
