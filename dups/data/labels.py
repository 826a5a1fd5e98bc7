"""Class definitions and label remapping of each dataset, as its standard evaluation uses them.

Every remapped label is uint8: classes 0..K-1, ``IGNORE`` (255) for unlabelled pixels.
Cityscapes comes from the ``cityscapesscripts`` package's own label table.
"""
from __future__ import annotations

import numpy as np

IGNORE = 255

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# COCO-Stuff-164k: stuffthingmaps hold (COCO category id - 1), 0..181, 255 unlabelled. Eleven
# thing ids are unused, leaving the 171 classes that the benchmark evaluates.
_COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}  # 1-based category ids
COCOSTUFF_USED_IDS = tuple(i for i in range(182) if i + 1 not in _COCO_UNUSED_IDS)
COCOSTUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)


def _lookup(pairs: dict[int, int]) -> np.ndarray:
    table = np.full(256, IGNORE, dtype=np.uint8)
    for src, dst in pairs.items():
        table[src] = dst
    return table


def cityscapes_table() -> tuple[np.ndarray, tuple[str, ...]]:
    """labelIds -> trainIds (19 classes) from cityscapesscripts' own label table."""
    from cityscapesscripts.helpers.labels import labels

    train = sorted({lb.trainId for lb in labels if 0 <= lb.trainId < IGNORE})
    names = tuple(next(lb.name for lb in labels if lb.trainId == t and not lb.ignoreInEval)
                  for t in train)
    pairs = {lb.id: lb.trainId for lb in labels
             if lb.id >= 0 and 0 <= lb.trainId < IGNORE and not lb.ignoreInEval}
    return _lookup(pairs), names


def remap_table(dataset: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(256-entry uint8 lookup from raw label values to train ids, class names)."""
    if dataset == "ade20k":  # 0 = "other" (ignored), 1..150 -> 0..149
        return _lookup({i + 1: i for i in range(150)}), ADE20K_CLASSES
    if dataset == "cocostuff":
        return _lookup({raw: i for i, raw in enumerate(COCOSTUFF_USED_IDS)}), COCOSTUFF_CLASSES
    if dataset == "cityscapes":
        return cityscapes_table()
    raise ValueError(f"no label table for dataset {dataset!r}")


def dataset_ids(dataset: str) -> np.ndarray:
    """Train id -> the dataset's own label value (the inverse of ``remap_table``), so a
    prediction can be written as the dataset's annotations are: ADE20K 1..150, COCO-Stuff's
    stuffthingmaps ids, Cityscapes labelIds."""
    table, names = remap_table(dataset)
    ids = np.zeros(len(names), dtype=np.uint8)
    for raw in range(255, -1, -1):  # the smallest raw value of each class wins
        if table[raw] != IGNORE:
            ids[table[raw]] = raw
    return ids


def valid_raw_values(dataset: str) -> np.ndarray:
    """Raw label values that a correct annotation of ``dataset`` may contain."""
    table, _ = remap_table(dataset)
    valid = table != IGNORE
    if dataset == "ade20k":
        valid[0] = True  # "other"
    elif dataset == "cocostuff":
        valid[IGNORE] = True
    elif dataset == "cityscapes":
        from cityscapesscripts.helpers.labels import labels
        for lb in labels:
            if lb.id >= 0:
                valid[lb.id] = True
    return valid
