"""``data check``: summarise a data set and list every problem found in it, file by file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from acdc_prune.data.nifti import check_finite, check_label_values, check_pair, open_nifti, read_volume
from acdc_prune.data.records import VolumeRecord, detect_layout, discover_with
from acdc_prune.errors import DataError


@dataclass
class DatasetReport:
    """Result of :func:`check_dataset`.

    Attributes:
        summary: counts and ranges (keys: root, layout, patients, volumes, labelled_volumes, groups,
            phases, in_plane_spacing_mm, slice_spacing_mm, shape_x, shape_y, slices, label_values,
            image_dtypes, spacing_from_pixdim).
        problems: one line per problem, each naming the file.
    """

    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary_rows(self) -> list[tuple[str, str]]:
        """``(name, value)`` pairs of the summary as display strings, for a two-column table."""
        rows = []
        for key, value in self.summary.items():
            if isinstance(value, dict):
                text = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
            elif isinstance(value, (list, tuple)):
                text = " - ".join(str(v) for v in value) if key != "label_values" else str(list(value))
            else:
                text = str(value)
            rows.append((key.replace("_", " "), text))
        return rows


def _range(values: list[float]) -> list[float]:
    return [round(min(values), 4), round(max(values), 4)] if values else []


def _check_record(record: VolumeRecord, stats: dict[str, list], problems: list[str]) -> None:
    """Read one volume and its label completely; add figures to ``stats`` and problems to ``problems``."""
    try:
        image = open_nifti(record.image)
        check_finite(read_volume(record.image)[0], record.image)
    except DataError as err:
        problems.append(str(err))
        return
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    shape = image.shape[:3]
    stats["in_plane"].extend(zooms[:2])
    stats["slice"].append(zooms[2])
    stats["x"].append(shape[0])
    stats["y"].append(shape[1])
    stats["z"].append(shape[2])
    stats["dtype"].append(str(image.get_data_dtype()))
    norms = np.linalg.norm(image.affine[:3, :3], axis=0)
    stats["pixdim"].append(not np.allclose(norms, zooms, rtol=1e-4))
    if record.label is None:
        return
    try:
        label = open_nifti(record.label)
        data, _ = read_volume(record.label)
        check_pair(image, label, record.image, record.label)
        values = np.unique(data)
        stats["labels"].update(float(v) for v in values)
        check_label_values(values, record.label)
    except DataError as err:
        problems.append(str(err))


def check_dataset(root: str | Path, layout: str = "auto") -> DatasetReport:
    """Summarise a data set and list every problem found (the data set is read completely).

    Problems: an unreadable, truncated or non-NIfTI file; NaN or infinite voxels; an image/label shape
    or affine mismatch; label values outside 0..3; a missing Info.cfg, Info.cfg key or ED/ES frame; a 2D
    or 4D file where a 3D volume is expected; labels missing for some volumes while others have them.

    Args:
        root: an ACDC or nnU-Net raw folder (see :func:`~acdc_prune.data.discover`).
        layout: ``"auto"``, ``"acdc"`` or ``"nnunet"``.

    Returns:
        A :class:`DatasetReport`; ``report.ok`` is False when any problem was found.
    """
    root = Path(root).expanduser()
    report = DatasetReport(summary={"root": str(root)})
    try:
        report.summary["layout"] = detect_layout(root) if layout == "auto" else layout
        records = discover_with(root, layout, False, lambda err: report.problems.append(str(err)))
    except DataError as err:
        report.problems.append(str(err))
        return report
    stats: dict[str, Any] = {k: [] for k in ("in_plane", "slice", "x", "y", "z", "dtype", "pixdim")}
    stats["labels"] = set()
    for record in records:
        _check_record(record, stats, report.problems)
    labelled = [r for r in records if r.label is not None]
    if labelled and len(labelled) < len(records):
        report.problems.extend(
            f"{r.image}: no label file, while {len(labelled)} other volumes have one"
            for r in records
            if r.label is None
        )
    patients = {r.patient: r.group for r in records}
    report.summary.update(
        {
            "patients": len(patients),
            "volumes": len(records),
            "labelled_volumes": len(labelled),
            "groups": dict(sorted(Counter(g or "unknown" for g in patients.values()).items())),
            "phases": dict(sorted(Counter(r.phase or "unknown" for r in records).items())),
            "in_plane_spacing_mm": _range(stats["in_plane"]),
            "slice_spacing_mm": _range(stats["slice"]),
            "shape_x": _range(stats["x"]),
            "shape_y": _range(stats["y"]),
            "slices": _range(stats["z"]),
            "label_values": sorted(int(v) if float(v).is_integer() else v for v in stats["labels"]),
            "image_dtypes": dict(sorted(Counter(stats["dtype"]).items())),
            "spacing_from_pixdim": sum(stats["pixdim"]),
        }
    )
    return report
