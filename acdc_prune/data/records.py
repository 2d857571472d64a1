"""Volume records: discovery of ACDC and nnU-Net raw data sets, Info.cfg parsing, config resolution."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from acdc_prune.config import DEFAULT_CACHE, DataConfig
from acdc_prune.data.nifti import NIFTI_SUFFIXES
from acdc_prune.errors import DataError

PHASES = ("ED", "ES")
INFO_REQUIRED = ("ED", "ES")
_PATIENT_DIR = re.compile(r"^patient\d+$")
_CASE_FRAME = re.compile(r"^(?P<patient>.+?)_frame(?P<frame>\d+)$")
_CASE_PHASE = re.compile(r"^(?P<patient>.+?)_(?P<phase>ED|ES)$", re.IGNORECASE)


@dataclass(frozen=True)
class VolumeRecord:
    """One 3D volume (one cardiac phase of one patient) and where its files are.

    Attributes:
        patient: patient id, e.g. ``"patient001"``; the unit of the train/validation split.
        phase: ``"ED"``, ``"ES"``, or ``None`` where the layout does not tell.
        image: NIfTI image (X, Y, Z), Z the short-axis slice axis.
        label: NIfTI label volume of the same grid (0 background, 1 RV, 2 MYO, 3 LV), or ``None``.
        group: diagnostic group from Info.cfg (``NOR``, ``MINF``, ``DCM``, ``HCM``, ``RV``) or ``None``.
        frame: frame number in the cine sequence, or ``None``.
    """

    patient: str
    phase: str | None
    image: Path
    label: Path | None
    group: str | None
    frame: int | None


def _sort_key(record: VolumeRecord) -> tuple:
    phase_rank = PHASES.index(record.phase) if record.phase in PHASES else len(PHASES)
    return (record.patient, phase_rank, record.frame if record.frame is not None else -1, str(record.image))


def parse_info_cfg(path: Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines) and check that ED and ES are frame numbers.

    Returns:
        The keys and values as strings (ED, ES, Group, Height, NbFrame, Weight where present).

    Raises:
        DataError: missing or unreadable file, a line without ``:``, a missing ED/ES key, or an ED/ES
            value that is not a positive integer; the message names the file.
    """
    if not path.is_file():
        raise DataError(f"{path}: Info.cfg not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable Info.cfg ({err.__class__.__name__})") from None
    info: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise DataError(f"{path}: line {number} is not 'Key: value': {line.strip()[:60]!r}")
        info[key.strip()] = value.strip()
    for key in INFO_REQUIRED:
        if key not in info:
            raise DataError(
                f"{path}: missing key '{key}' (expected {', '.join(INFO_REQUIRED)} frame numbers)"
            )
        if not info[key].isdigit() or int(info[key]) < 1:
            raise DataError(f"{path}: {key} must be a positive frame number, got {info[key]!r}")
    return info


def _nifti_file(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _acdc_patient(folder: Path, require_labels: bool) -> list[VolumeRecord]:
    info = parse_info_cfg(folder / "Info.cfg")
    if int(info["ED"]) == int(info["ES"]):
        raise DataError(f"{folder / 'Info.cfg'}: ED and ES name the same frame ({info['ED']})")
    records = []
    for phase in PHASES:
        frame = int(info[phase])
        stem = f"{folder.name}_frame{frame:02d}"
        image = _nifti_file(folder, stem)
        if image is None:
            raise DataError(f"{folder / (stem + '.nii.gz')}: {phase} frame {frame} (from Info.cfg) not found")
        label = _nifti_file(folder, f"{stem}_gt")
        if label is None and require_labels:
            raise DataError(f"{folder / (stem + '_gt.nii.gz')}: label of the {phase} frame not found")
        records.append(VolumeRecord(folder.name, phase, image, label, info.get("Group") or None, frame))
    return records


def _discover_acdc(
    root: Path, require_labels: bool, on_error: Callable[[DataError], None]
) -> list[VolumeRecord]:
    patients = sorted(p for p in root.iterdir() if p.is_dir() and _PATIENT_DIR.match(p.name))
    if not patients:
        raise DataError(f"{root}: no patientNNN/ folders, not an ACDC data set")
    records: list[VolumeRecord] = []
    for folder in patients:
        try:
            records.extend(_acdc_patient(folder, require_labels))
        except DataError as err:
            on_error(err)
    return records


def _case_identity(case: str) -> tuple[str, str | None, int | None]:
    """``patient001_frame01`` -> (``patient001``, None, 1); ``p1_ES`` -> (``p1``, ``ES``, None)."""
    match = _CASE_FRAME.match(case)
    if match:
        return match["patient"], None, int(match["frame"])
    match = _CASE_PHASE.match(case)
    if match:
        return match["patient"], match["phase"].upper(), None
    return case, None, None


def _nnunet_folders(root: Path) -> list[tuple[Path, Path]]:
    """(images, labels) folder pairs: a dataset folder (imagesTr, else imagesTs) or one images* folder."""
    if root.name.startswith("images"):
        return [(root, root.parent / root.name.replace("images", "labels", 1))]
    for suffix in ("Tr", "Ts"):
        if (root / f"images{suffix}").is_dir():
            return [(root / f"images{suffix}", root / f"labels{suffix}")]
    raise DataError(f"{root}: no imagesTr/ or imagesTs/ folder, not an nnU-Net raw data set")


def _file_ending(root: Path) -> str:
    dataset_json = (root.parent if root.name.startswith("images") else root) / "dataset.json"
    if not dataset_json.is_file():
        return ".nii.gz"
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{dataset_json}: not valid JSON ({err.__class__.__name__})") from None
    ending = meta.get("file_ending", ".nii.gz") if isinstance(meta, dict) else ".nii.gz"
    if ending not in NIFTI_SUFFIXES:
        raise DataError(f"{dataset_json}: file_ending {ending!r} is not supported (use .nii.gz or .nii)")
    return ending


def _discover_nnunet(
    root: Path, require_labels: bool, on_error: Callable[[DataError], None]
) -> list[VolumeRecord]:
    ending = _file_ending(root)
    ((images_dir, labels_dir),) = _nnunet_folders(root)
    cases: list[tuple[str, Path, Path | None]] = []
    for image in sorted(images_dir.iterdir()):
        if image.name.startswith(".") or not image.name.endswith(ending):
            continue
        stem = image.name[: -len(ending)]
        if not stem.endswith("_0000"):
            on_error(DataError(f"{image}: only single-channel images (<case>_0000{ending}) are supported"))
            continue
        case = stem[: -len("_0000")]
        label = labels_dir / f"{case}{ending}"
        if not label.is_file():
            if require_labels:
                on_error(DataError(f"{label}: label of case {case} not found"))
                continue
            label = None
        cases.append((case, image, label))
    if not cases:
        raise DataError(f"{images_dir}: no <case>_0000{ending} images found")
    by_patient: dict[str, list[tuple[str | None, int | None, Path, Path | None]]] = defaultdict(list)
    for case, image, label in cases:
        patient, phase, frame = _case_identity(case)
        by_patient[patient].append((phase, frame, image, label))
    records = []
    for patient, items in by_patient.items():
        frames = sorted(f for _, f, _, _ in items if f is not None)
        for phase, frame, image, label in items:
            # ACDC cine sequences start at end-diastole: of a patient's two frames the first is ED.
            if phase is None and len(items) == 2 and len(frames) == 2 and frames[0] != frames[1]:
                phase = "ED" if frame == frames[0] else "ES"
            records.append(VolumeRecord(patient, phase, image, label, None, frame))
    return records


def detect_layout(root: Path) -> str:
    """``"acdc"`` or ``"nnunet"`` from the folder's contents.

    Raises:
        DataError: the folder is missing, empty, or neither layout.
    """
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"{root}: data folder is empty")
    if root.name.startswith("images") or any((root / n).is_dir() for n in ("imagesTr", "imagesTs")):
        return "nnunet"
    if any(p.is_dir() and _PATIENT_DIR.match(p.name) for p in entries):
        return "acdc"
    raise DataError(
        f"{root}: neither an ACDC folder (patientNNN/ with Info.cfg) nor an nnU-Net raw folder (imagesTr/)"
    )


def _raise(err: DataError) -> None:
    raise err


def discover_with(
    root: str | Path, layout: str, require_labels: bool, on_error: Callable[[DataError], None]
) -> list[VolumeRecord]:
    """:func:`discover`, calling ``on_error`` for per-patient or per-case problems (``check_dataset``)."""
    root = Path(root).expanduser()
    found = detect_layout(root)
    if layout not in ("auto", "acdc", "nnunet"):
        raise DataError(f"{root}: unknown layout {layout!r} (use auto, acdc or nnunet)")
    if layout != "auto" and layout != found:
        raise DataError(f"{root}: layout '{layout}' requested but the folder looks like the '{found}' layout")
    discover_layout = _discover_acdc if found == "acdc" else _discover_nnunet
    return sorted(discover_layout(root, require_labels, on_error), key=_sort_key)


def discover(root: str | Path, layout: str = "auto", require_labels: bool = False) -> list[VolumeRecord]:
    """Find every volume of a data set.

    Args:
        root: an ACDC folder (``patientNNN/`` sub-folders with ``Info.cfg``), an nnU-Net raw data set
            folder (``imagesTr/`` and ``labelsTr/``, or ``imagesTs/`` and ``labelsTs/`` when there is
            no ``imagesTr/``), or one nnU-Net ``images*`` folder.
        layout: ``"auto"``, ``"acdc"`` or ``"nnunet"``.
        require_labels: refuse volumes without a label (training); inference passes ``False``.

    Returns:
        Records sorted by patient, then ED before ES.

    Raises:
        DataError: the first problem found (empty folder, wrong layout, missing Info.cfg key, missing
            ED/ES frame or label); the message names the file.
    """
    return discover_with(root, layout, require_labels, _raise)


def load_records(
    data_cfg: DataConfig, cache_dir: str | Path = DEFAULT_CACHE, require_labels: bool = True
) -> list[VolumeRecord]:
    """Records of the configured data set: ``data_cfg.root``, or the phantom when the root is null.

    Args:
        data_cfg: the ``data`` config section (root, layout, phantom_patients, phantom_seed, cache_dir).
        cache_dir: the cache folder (``Config.cache_dir``); the phantom is generated there once.
        require_labels: refuse volumes without a label.
    """
    from acdc_prune.data.phantom import phantom_root

    if data_cfg.root is None:
        root = phantom_root(Path(cache_dir), data_cfg.phantom_patients, data_cfg.phantom_seed)
        return discover(root, "acdc", require_labels)
    return discover(data_cfg.root, data_cfg.layout, require_labels)
