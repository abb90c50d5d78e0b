"""Class-name tables of the indoor benchmarks: NYU40, ScanNet20 and ScanNet200.

Every table maps a class id, as it appears in label images and labelled point clouds, to its name. Id 0
is "unlabelled" in all of them and is never part of a table.

- **NYU40** (ids 1..40): the label set of ScanNet's ``nyu40_label`` / ``nyu40id`` columns.
- **ScanNet20**: the 20 classes of the ScanNet semantic-segmentation benchmark, keyed by their NYU40 ids
  (every other NYU40 id counts as ignore in that benchmark).
- **ScanNet200**: the 200 classes of the ScanNet200 benchmark, keyed by ScanNet's raw category ids (the
  ``id`` column of ``scannetv2-labels.combined.tsv``, which ScanNet's ``label-filt`` images hold). Ids and
  names are ``VALID_CLASS_IDS_200`` and ``CLASS_LABELS_200`` of ScanNet's official
  ``BenchmarkScripts/ScanNet200/scannet200_constants.py`` (github.com/ScanNet/ScanNet, commit 520d564),
  in the same order.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

BACKGROUND_CLASS_NAMES: Tuple[str, ...] = ("wall", "floor", "ceiling")
"""Classes left out of "foreground" averages (SceneSplat/Chorus protocol); they still take part in
prediction."""

NYU40_CLASS_NAMES: Tuple[str, ...] = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)
"""NYU40 names in id order: ``NYU40_CLASS_NAMES[i - 1]`` is class ``i``."""

SCANNET20_CLASS_IDS: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
"""The ScanNet20 benchmark classes as NYU40 ids (``VALID_CLASS_IDS_20``)."""

# Dense layout: one name or id per line would take 400 lines.
# fmt: off
SCANNET200_CLASS_IDS: Tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24, 26, 27, 28, 29, 31, 32, 33,
    34, 35, 36, 38, 39, 40, 41, 42, 44, 45, 46, 47, 48, 49, 50, 51, 52, 54, 55, 56, 57, 58, 59, 62, 63, 64,
    65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 82, 84, 86, 87, 88, 89, 90, 93, 95, 96,
    97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 110, 112, 115, 116, 118, 120, 121, 122, 125, 128, 130,
    131, 132, 134, 136, 138, 139, 140, 141, 145, 148, 154, 155, 156, 157, 159, 161, 163, 165, 166, 168, 169,
    170, 177, 180, 185, 188, 191, 193, 195, 202, 208, 213, 214, 221, 229, 230, 232, 233, 242, 250, 261, 264,
    276, 283, 286, 300, 304, 312, 323, 325, 331, 342, 356, 370, 392, 395, 399, 408, 417, 488, 540, 562, 570,
    572, 581, 609, 748, 776, 1156, 1163, 1164, 1165, 1166, 1167, 1168, 1169, 1170, 1171, 1172, 1173, 1174,
    1175, 1176, 1178, 1179, 1180, 1181, 1182, 1183, 1184, 1185, 1186, 1187, 1188, 1189, 1190, 1191,
)
"""ScanNet200 class ids (ScanNet raw category ids), ``VALID_CLASS_IDS_200``."""

SCANNET200_CLASS_LABELS: Tuple[str, ...] = (
    "wall", "chair", "floor", "table", "door", "couch", "cabinet", "shelf", "desk", "office chair", "bed",
    "pillow", "sink", "picture", "window", "toilet", "bookshelf", "monitor", "curtain", "book", "armchair",
    "coffee table", "box", "refrigerator", "lamp", "kitchen cabinet", "towel", "clothes", "tv", "nightstand",
    "counter", "dresser", "stool", "cushion", "plant", "ceiling", "bathtub", "end table", "dining table",
    "keyboard", "bag", "backpack", "toilet paper", "printer", "tv stand", "whiteboard", "blanket",
    "shower curtain", "trash can", "closet", "stairs", "microwave", "stove", "shoe", "computer tower",
    "bottle", "bin", "ottoman", "bench", "board", "washing machine", "mirror", "copier", "basket",
    "sofa chair", "file cabinet", "fan", "laptop", "shower", "paper", "person", "paper towel dispenser",
    "oven", "blinds", "rack", "plate", "blackboard", "piano", "suitcase", "rail", "radiator", "recycling bin",
    "container", "wardrobe", "soap dispenser", "telephone", "bucket", "clock", "stand", "light",
    "laundry basket", "pipe", "clothes dryer", "guitar", "toilet paper holder", "seat", "speaker", "column",
    "bicycle", "ladder", "bathroom stall", "shower wall", "cup", "jacket", "storage bin", "coffee maker",
    "dishwasher", "paper towel roll", "machine", "mat", "windowsill", "bar", "toaster", "bulletin board",
    "ironing board", "fireplace", "soap dish", "kitchen counter", "doorframe", "toilet paper dispenser",
    "mini fridge", "fire extinguisher", "ball", "hat", "shower curtain rod", "water cooler", "paper cutter",
    "tray", "shower door", "pillar", "ledge", "toaster oven", "mouse", "toilet seat cover dispenser",
    "furniture", "cart", "storage container", "scale", "tissue box", "light switch", "crate", "power outlet",
    "decoration", "sign", "projector", "closet door", "vacuum cleaner", "candle", "plunger", "stuffed animal",
    "headphones", "dish rack", "broom", "guitar case", "range hood", "dustpan", "hair dryer", "water bottle",
    "handicap bar", "purse", "vent", "shower floor", "water pitcher", "mailbox", "bowl", "paper bag",
    "alarm clock", "music stand", "projector screen", "divider", "laundry detergent", "bathroom counter",
    "object", "bathroom vanity", "closet wall", "laundry hamper", "bathroom stall door", "ceiling light",
    "trash bin", "dumbbell", "stair rail", "tube", "bathroom cabinet", "cd case", "closet rod",
    "coffee kettle", "structure", "shower head", "keyboard piano", "case of water bottles", "coat rack",
    "storage organizer", "folded chair", "fire alarm", "power strip", "calendar", "poster", "potted plant",
    "luggage", "mattress",
)
"""ScanNet200 class names in the order of ``SCANNET200_CLASS_IDS`` (``CLASS_LABELS_200``)."""
# fmt: on

NYU40: Dict[int, str] = {i + 1: name for i, name in enumerate(NYU40_CLASS_NAMES)}
"""NYU40 id -> name."""
SCANNET20: Dict[int, str] = {i: NYU40[i] for i in SCANNET20_CLASS_IDS}
"""ScanNet20 benchmark classes: NYU40 id -> name."""
SCANNET200: Dict[int, str] = dict(zip(SCANNET200_CLASS_IDS, SCANNET200_CLASS_LABELS, strict=True))
"""ScanNet200 benchmark classes: ScanNet raw category id -> name."""

CLASS_TABLES: Dict[str, Dict[int, str]] = {"nyu40": NYU40, "scannet20": SCANNET20, "scannet200": SCANNET200}
"""Every table by the name ``class_names`` accepts."""


def class_names(table: str) -> Dict[int, str]:
    """A fresh ``{class id: name}`` dict of ``table`` ("nyu40", "scannet20" or "scannet200", any case)."""
    key = table.strip().lower()
    if key not in CLASS_TABLES:
        raise ValueError(f"Unknown class table {table!r}; available: {', '.join(sorted(CLASS_TABLES))}.")
    return dict(CLASS_TABLES[key])


def foreground_class_ids(names: Mapping[int, str]) -> List[int]:
    """Sorted ids of ``names`` other than unlabelled (0) and the background classes (wall, floor, ceiling)."""
    background = set(BACKGROUND_CLASS_NAMES)
    return sorted(i for i, name in names.items() if i != 0 and name.strip().lower() not in background)
