"""``python -m cass_engine.predict`` defaults: the labeling job's preset and vocabulary."""

from __future__ import annotations

from cass_engine.config import DEFAULT_PRESET, PRESETS
from cass_engine.predict import build_config, parse_args


def test_without_preset_or_vocab_predict_uses_the_jobs_default_preset(tmp_path):
    from jobs.label import build_parser, job_from_args

    config = build_config(parse_args(["--image", "a.png", "--out", "o.npz"]))
    assert config.preset == DEFAULT_PRESET == "coco_stuff"
    assert config.vocabulary_file == PRESETS[DEFAULT_PRESET].vocabulary_file
    assert config.vocabulary_path is None
    job = job_from_args(build_parser().parse_args(["--input", str(tmp_path / "i"),
                                                   "--output", str(tmp_path / "o")]))
    assert job.engine.config == config  # the job and the CLI label with the same config


def test_predict_help_states_every_default():
    from cass_engine.predict import build_parser

    parser = build_parser()
    optional = [a for a in parser._actions if a.option_strings and not a.required
                and a.dest != "help"]
    assert {a.dest for a in optional} >= {"preset", "vocab", "device", "dtype", "short_side"}
    for action in optional:
        assert "default" in (action.help or ""), action.option_strings
    assert f"(default: {DEFAULT_PRESET})" in parser.format_help()
