"""Semantic segmentation scores from one confusion matrix accumulated over a whole scene or data set.

Scores are always read off a single matrix summed over every image or point, never averaged over
per-image scores: a class that fills one image and is absent from another would otherwise be weighted
by how many images it happens to appear in.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, Int

ArrayLike = Union[np.ndarray, torch.Tensor]

BACKGROUND_NAMES: tuple[str, ...] = ("wall", "floor", "ceiling")
"""Classes left out of the foreground averages (SceneSplat/Chorus protocol). They still take part in
prediction: a wall predicted as chair still lowers chair's IoU."""


def _as_int_array(values: ArrayLike, what: str) -> np.ndarray:
    """Flat int64 numpy copy of integer labels (numpy or torch, any device, any shape)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer):
        # Float labels usually mean scores or features were passed by mistake; truncating them would
        # produce a plausible-looking but meaningless score.
        raise TypeError(f"{what} must hold integer class ids, got dtype {values.dtype}")
    return values.reshape(-1).astype(np.int64, copy=False)


def remap_labels(
    labels: ArrayLike, class_ids: Sequence[int], ignore_index: int = -1
) -> Int[np.ndarray, "..."]:
    """Maps raw label ids to confusion-matrix indices: ``class_ids[i] -> i``, any other id -> ignore_index.

    For example ScanNet20 evaluates NYU40 ids ``(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28,
    33, 34, 36, 39)`` as classes 0..19 and ignores the rest. The output keeps the input's shape.
    """
    ids = np.asarray(list(class_ids), dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0 or len(np.unique(ids)) != len(ids):
        raise ValueError(
            f"class_ids must be a non-empty sequence of distinct integers, got {list(class_ids)}"
        )
    shape = tuple(np.shape(labels))
    flat = _as_int_array(labels, "labels")
    out = np.full(flat.shape, ignore_index, dtype=np.int64)
    order = np.argsort(ids)
    sorted_ids = ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, flat), 0, len(ids) - 1)
    hit = sorted_ids[pos] == flat
    out[hit] = order[pos[hit]]
    return out.reshape(shape)


class ConfusionMatrix:
    """Counts of (ground truth, prediction) pairs over ``num_classes`` classes.

    ``matrix[g, p]`` (rows ground truth, columns prediction) counts the entries of class g predicted as
    p. Ground-truth entries equal to ``ignore_index`` or outside ``[0, num_classes)`` are skipped.
    A prediction outside ``[0, num_classes)`` (for example ``-1`` for "no label", a point no view saw)
    is counted in a separate "no prediction" column, :attr:`missed`: it is a false negative of its
    ground-truth class (lowers that class's IoU and accuracy) and a false positive of no class.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # The last column is "no prediction"; keeping it in one array makes update a single bincount.
        self._counts = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    @property
    def matrix(self) -> Int[np.ndarray, "K K"]:
        """The [K, K] confusion matrix (a view; rows ground truth, columns prediction)."""
        return self._counts[:, : self.num_classes]

    @property
    def missed(self) -> Int[np.ndarray, " K"]:
        """Per ground-truth class, entries whose prediction was outside ``[0, K)``."""
        return self._counts[:, self.num_classes]

    def update(self, pred: ArrayLike, gt: ArrayLike) -> ConfusionMatrix:
        """Adds predictions and ground truth of any (equal) shape, numpy or torch. Returns self."""
        pred_flat = _as_int_array(pred, "pred")
        gt_flat = _as_int_array(gt, "gt")
        if pred_flat.shape != gt_flat.shape:
            raise ValueError(
                f"pred and gt must have the same number of entries, got {tuple(np.shape(pred))} "
                f"and {tuple(np.shape(gt))}"
            )
        k = self.num_classes
        valid = (gt_flat != self.ignore_index) & (gt_flat >= 0) & (gt_flat < k)
        gt_flat, pred_flat = gt_flat[valid], pred_flat[valid]
        pred_flat = np.where((pred_flat >= 0) & (pred_flat < k), pred_flat, k)
        self._counts += np.bincount(gt_flat * (k + 1) + pred_flat, minlength=k * (k + 1)).reshape(k, k + 1)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Adds the counts of another matrix over the same classes (for example another scene). Returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge confusion matrices over {self.num_classes} and {other.num_classes} classes"
            )
        self._counts += other._counts
        return self

    def counts(self) -> list:
        """The counts as nested lists (JSON-ready), the "no prediction" column last; ``from_counts`` reads them."""
        return self._counts.tolist()

    @classmethod
    def from_counts(cls, counts, ignore_index: int = -1) -> ConfusionMatrix:
        """A matrix from ``counts()`` (e.g. one scene's, read back from a report)."""
        array = np.asarray(counts, dtype=np.int64)
        if array.ndim != 2 or array.shape[1] != array.shape[0] + 1:
            raise ValueError(f"confusion counts must be [K, K + 1], got {array.shape}")
        matrix = cls(array.shape[0], ignore_index)
        matrix._counts = array.copy()
        return matrix

    def reset(self) -> None:
        """Sets every count to zero."""
        self._counts[:] = 0

    def gt_counts(self) -> Int[np.ndarray, " K"]:
        """Ground-truth entries per class (including those with no prediction)."""
        return self._counts.sum(axis=1)

    def pred_counts(self) -> Int[np.ndarray, " K"]:
        """Entries predicted as each class (over valid ground truth)."""
        return self.matrix.sum(axis=0)

    def iou(self) -> Float[np.ndarray, " K"]:
        """Per-class intersection over union, TP / (GT + predicted - TP); NaN where a class is absent
        from both ground truth and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.gt_counts() + self.pred_counts() - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def accuracy(self) -> Float[np.ndarray, " K"]:
        """Per-class accuracy (recall), TP / GT; NaN for classes absent from the ground truth."""
        tp = np.diag(self.matrix).astype(np.float64)
        gt = self.gt_counts()
        return np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)

    def _mean_over_present(self, values: np.ndarray, classes: Optional[Iterable[int]]) -> float:
        """Mean of ``values`` over the classes present in the ground truth (and in ``classes``)."""
        present = self.gt_counts() > 0
        if classes is not None:
            chosen = np.zeros(self.num_classes, dtype=bool)
            indices = np.asarray(list(classes), dtype=np.int64)
            if indices.size and (indices.min() < 0 or indices.max() >= self.num_classes):
                raise ValueError(f"classes must be in [0, {self.num_classes}), got {indices.tolist()}")
            chosen[indices] = True
            present &= chosen
        selected = values[present]
        selected = selected[~np.isnan(selected)]
        return float(selected.mean()) if selected.size else math.nan

    def miou(self, classes: Optional[Iterable[int]] = None) -> float:
        """Mean IoU over the classes that appear in the ground truth, optionally only over ``classes``.

        Classes predicted but absent from the ground truth do not enter the mean (their IoU is 0), but
        their false positives still lower the IoU of the classes they were confused with. NaN when no
        selected class appears in the ground truth.
        """
        return self._mean_over_present(self.iou(), classes)

    def macc(self, classes: Optional[Iterable[int]] = None) -> float:
        """Mean per-class accuracy over the classes that appear in the ground truth (and in ``classes``)."""
        return self._mean_over_present(self.accuracy(), classes)

    def overall_accuracy(self) -> float:
        """Fraction of all valid ground-truth entries predicted correctly; NaN when there are none."""
        total = int(self._counts.sum())
        return float(np.trace(self.matrix) / total) if total else math.nan

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, entries={int(self._counts.sum())})"


def _json_float(value: float) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) else value


def _class_name_list(class_names: Union[Mapping[int, str], Sequence[str]], num_classes: int) -> List[str]:
    if isinstance(class_names, Mapping):
        bad = [key for key in class_names if not 0 <= int(key) < num_classes]
        if bad:
            raise ValueError(
                f"class_names keys are confusion-matrix indices in [0, {num_classes}); got {bad} "
                "(map raw label ids to indices first, for example with remap_labels)"
            )
        names = [str(class_names.get(i, f"class_{i}")) for i in range(num_classes)]
    else:
        names = [str(name) for name in class_names]
        if len(names) != num_classes:
            raise ValueError(f"got {len(names)} class names for a confusion matrix of {num_classes} classes")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"class names must be distinct, repeated: {duplicates}")
    return names


def foreground_classes(
    class_names: Union[Mapping[int, str], Sequence[str]],
    num_classes: int,
    background_names: Sequence[str] = BACKGROUND_NAMES,
) -> List[int]:
    """Indices of the classes whose name (case-insensitive) is not one of ``background_names``."""
    background = {name.strip().lower() for name in background_names}
    names = _class_name_list(class_names, num_classes)
    return [i for i, name in enumerate(names) if name.strip().lower() not in background]


def segmentation_scores(
    cm: ConfusionMatrix,
    class_names: Union[Mapping[int, str], Sequence[str]],
    background_names: Sequence[str] = BACKGROUND_NAMES,
) -> Dict[str, object]:
    """All scores of one confusion matrix as plain Python values (JSON-safe: NaN becomes None).

    Args:
        cm: The accumulated confusion matrix.
        class_names: Name of each confusion-matrix index: a list of K names, or a dict index -> name
            (missing indices are called ``class_<i>``).
        background_names: Classes left out of ``fg_miou``/``fg_macc`` (compared case-insensitively).
            They still take part in prediction; they are only left out of the average.

    Returns:
        ``{"miou", "macc", "fg_miou", "fg_macc", "overall_acc", "per_class": {name: {"iou", "acc",
        "gt_count"}}}``.
    """
    names = _class_name_list(class_names, cm.num_classes)
    foreground = foreground_classes(names, cm.num_classes, background_names)
    iou, acc, gt = cm.iou(), cm.accuracy(), cm.gt_counts()
    return {
        "miou": _json_float(cm.miou()),
        "macc": _json_float(cm.macc()),
        "fg_miou": _json_float(cm.miou(foreground)),
        "fg_macc": _json_float(cm.macc(foreground)),
        "overall_acc": _json_float(cm.overall_accuracy()),
        "per_class": {
            name: {"iou": _json_float(iou[i]), "acc": _json_float(acc[i]), "gt_count": int(gt[i])}
            for i, name in enumerate(names)
        },
    }


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def per_class_table(scores: Mapping[str, object]) -> str:
    """Markdown table of per-class IoU and accuracy (in percent) and ground-truth counts, from
    :func:`segmentation_scores`, followed by the mean rows. Missing values show as ``-``."""
    lines = ["| class | IoU (%) | Acc (%) | GT count |", "|---|---:|---:|---:|"]
    per_class = scores["per_class"]
    assert isinstance(per_class, Mapping)
    for name, row in per_class.items():
        lines.append(f"| {name} | {_percent(row['iou'])} | {_percent(row['acc'])} | {row['gt_count']} |")
    total = sum(int(row["gt_count"]) for row in per_class.values())
    lines.append(f"| **mean** | {_percent(scores['miou'])} | {_percent(scores['macc'])} | {total} |")
    lines.append(f"| **foreground mean** | {_percent(scores['fg_miou'])} | {_percent(scores['fg_macc'])} | |")
    return "\n".join(lines)
