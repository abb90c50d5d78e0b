"""Class-name tables: sizes, ids and names checked against the benchmarks' published lists."""

from __future__ import annotations

import pytest

from splatsem_ns.data.class_tables import (
    BACKGROUND_CLASS_NAMES,
    CLASS_TABLES,
    NYU40,
    SCANNET20,
    SCANNET20_CLASS_IDS,
    SCANNET200,
    SCANNET200_CLASS_IDS,
    SCANNET200_CLASS_LABELS,
    class_names,
    foreground_class_ids,
)
from splatsem_ns.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES

# The NYU40 list as the ScanNet data README gives it (ids 1..40).
NYU40_README = (
    "wall, floor, cabinet, bed, chair, sofa, table, door, window, bookshelf, picture, counter, blinds, desk, "
    "shelves, curtain, dresser, pillow, mirror, floor mat, clothes, ceiling, books, refrigerator, television, "
    "paper, towel, shower curtain, box, whiteboard, person, night stand, toilet, sink, lamp, bathtub, bag, "
    "otherstructure, otherfurniture, otherprop"
)
# ScanNet's CLASS_LABELS_20, in the order of VALID_CLASS_IDS_20.
SCANNET20_LABELS = (
    "wall floor cabinet bed chair sofa table door window bookshelf picture counter desk curtain refrigerator "
    "shower_curtain toilet sink bathtub otherfurniture"
)


def test_nyu40() -> None:
    assert list(NYU40) == list(range(1, 41))
    assert list(NYU40.values()) == NYU40_README.split(", ")
    assert (NYU40[22], NYU40[39], NYU40[40]) == ("ceiling", "otherfurniture", "otherprop")


def test_scannet20_is_the_benchmark_subset_of_nyu40() -> None:
    assert SCANNET20_CLASS_IDS == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
    assert tuple(SCANNET20) == SCANNET20_CLASS_IDS
    assert [n.replace(" ", "_") for n in SCANNET20.values()] == SCANNET20_LABELS.split()
    assert all(NYU40[i] == name for i, name in SCANNET20.items())


def test_scannet200_ids_and_names() -> None:
    assert len(SCANNET200_CLASS_IDS) == len(SCANNET200_CLASS_LABELS) == len(SCANNET200) == 200
    assert len(set(SCANNET200_CLASS_LABELS)) == 200
    assert list(SCANNET200_CLASS_IDS) == sorted(set(SCANNET200_CLASS_IDS))
    assert (SCANNET200_CLASS_IDS[0], SCANNET200_CLASS_IDS[-1]) == (1, 1191)
    # Spot checks against ScanNet's raw category ids (scannetv2-labels.combined.tsv).
    expected = {1: "wall", 2: "chair", 3: "floor", 6: "couch", 40: "plant", 41: "ceiling", 1191: "mattress"}
    assert {i: SCANNET200[i] for i in expected} == expected
    assert 12 not in SCANNET200 and 1177 not in SCANNET200  # ids absent from the benchmark
    assert SCANNET200_CLASS_LABELS[-5:] == ("calendar", "poster", "potted plant", "luggage", "mattress")


def test_class_names_returns_fresh_tables_by_name() -> None:
    assert class_names("nyu40") == NYU40 and class_names(" ScanNet20 ") == SCANNET20
    assert class_names("scannet200") == SCANNET200
    table = class_names("nyu40")
    table[1] = "changed"
    assert NYU40[1] == "wall" and class_names("nyu40")[1] == "wall"
    with pytest.raises(ValueError, match="nyu40, scannet20, scannet200"):
        class_names("coco")
    assert set(CLASS_TABLES) == {"nyu40", "scannet20", "scannet200"}
    assert all(0 not in table for table in CLASS_TABLES.values())


def test_background_and_foreground() -> None:
    assert BACKGROUND_CLASS_NAMES == ("wall", "floor", "ceiling")
    assert set(NYU40) - set(foreground_class_ids(NYU40)) == {1, 2, 22}
    assert set(SCANNET200) - set(foreground_class_ids(SCANNET200)) == {1, 3, 41}
    assert foreground_class_ids({0: "unlabelled", 1: "Wall", 5: "chair"}) == [5]


def test_synthetic_scene_names_are_benchmark_names() -> None:
    known = set(NYU40.values()) | set(SCANNET200.values())
    assert set(SYNTHETIC_CLASS_NAMES.values()) <= known
