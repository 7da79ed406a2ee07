"""Output categories carry the vocabulary's display names: VOC21's and COCO-Object's class 0
is "background" in run.json, categories.json and exports, while its queries stay the preset's.
"""

from __future__ import annotations

import json

import pytest
from support.images import encode, photos

from cass_engine import CassConfig
from cass_engine.vocabulary import parse_vocabulary
from pipeline.config import ComputeConfig, EngineSpec, IOConfig, JobConfig
from pipeline.runner import run_job
from pipeline.stub import StubOptions
from schemas.labels import categories_from_classes, vocabulary_line


def test_display_names_become_category_names_and_lines_give_the_vocabulary_back():
    vocab = parse_vocabulary("[background] sky, wall, tree\naeroplane\nperson, man\n")
    cats = categories_from_classes(vocab.classes, vocab.class_names)
    assert [c.name for c in cats] == ["background", "aeroplane", "person"]
    assert cats[0].synonyms == ("sky", "wall", "tree")  # the queries, unchanged
    again = parse_vocabulary("\n".join(vocabulary_line(c) for c in cats))
    assert again.classes == vocab.classes and again.class_names == vocab.class_names
    assert again.content_hash() == vocab.content_hash()
    plain = categories_from_classes(vocab.classes)  # without names: the first query
    assert plain[0].name == "sky" and vocabulary_line(plain[0]) == "sky, wall, tree"


@pytest.mark.parametrize("preset", ["voc21", "coco_object"])
def test_a_job_records_background_by_its_display_name(preset, tmp_path, ray_cpus):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(photos(1, 32)[0]))
    config = CassConfig.from_preset(preset)
    job = JobConfig(IOConfig(str(tmp_path / "in"), str(tmp_path / "out")),
                    ComputeConfig(batch_size=2),
                    EngineSpec(config, stub=StubOptions()))
    assert run_job(job, emit=lambda _: None).status == "complete"
    document = json.loads((tmp_path / "out" / "categories.json").read_text())
    first = document["categories"][0]
    assert first["name"] == "background" and "background" not in first["synonyms"]
    assert first["synonyms"][0] == config.load_vocabulary().classes[0][0]


def test_display_names_are_part_of_the_runs_identity(tmp_path):
    from pipeline.record import fingerprint_of

    def spec(first_line: str) -> EngineSpec:
        path = tmp_path / f"{abs(hash(first_line))}.txt"
        path.write_text(f"{first_line}\ntree\n")
        config = CassConfig.from_preset("coco_stuff", vocabulary_path=str(path))
        return EngineSpec(config, stub=StubOptions())

    plain, named = spec("sky, wall"), spec("[bg] sky, wall")
    renamed = spec("[background] sky, wall")
    assert plain.vocabulary_hash == named.vocabulary_hash == renamed.vocabulary_hash
    assert "display_names" not in plain.identity()  # outputs without names keep their identity
    assert named.identity()["display_names"] == ["bg", "tree"]
    prints = {fingerprint_of(s.identity()) for s in (plain, named, renamed)}
    assert len(prints) == 3  # a resume cannot mix "bg" and "background" shards


def test_audit_overlays_use_the_engine_palette():
    import numpy as np

    from cass_engine.overlay import palette as engine_palette
    from pipeline.audit.plots import palette

    colors = palette(21).astype(int)
    assert colors.shape == (23, 3)
    assert (colors[:21] == engine_palette(21)).all()
    assert min(np.abs(colors[i] - colors[i + 1]).sum() for i in range(20)) > 40


@pytest.mark.parametrize("line", ["[cat] kitten, cat", "[background] sky, wall", "sky, wall",
                                  "[a, b] c", "person"])
def test_vocabulary_lines_keep_the_queries_in_order(line):
    vocab = parse_vocabulary(line + "\n")
    (cat,) = categories_from_classes(vocab.classes, vocab.class_names)
    again = parse_vocabulary(vocabulary_line(cat) + "\n")
    assert again.classes == vocab.classes and again.class_names == vocab.class_names
    assert again.content_hash() == vocab.content_hash()


def test_the_audit_reads_the_class_lists_the_png_export_writes():
    from pipeline.audit.categories import parse_class_list

    vocab = parse_vocabulary("[vehicle] car, truck\nsky\n[greenery] plant\n")
    lines = [vocabulary_line(c) for c in categories_from_classes(vocab.classes,
                                                                  vocab.class_names)]
    gt = parse_class_list("\n".join(lines) + "\n", "classes.txt")
    assert [(c.name, c.synonyms) for c in gt] == [
        ("vehicle", ("car", "truck")), ("sky", ()), ("greenery", ("plant",))]
