"""NIfTI reading with one-line errors, ACDC's spacing quirk, and byte-deterministic writing."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from acdc_prune.errors import DataError
from acdc_prune.io import atomic_write_bytes

LABEL_VALUES = (0, 1, 2, 3)
"""Label values of ACDC: 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def describe_error(err: BaseException) -> str:
    """First line of an exception's message, or its class name when it has none."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return first or err.__class__.__name__


def open_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only; the voxels are read later).

    Raises:
        DataError: the file is missing, not gzip, or not NIfTI; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError) as err:
        raise DataError(f"{path}: corrupt or truncated gzip ({describe_error(err)})") from None
    except Exception as err:  # nibabel raises several types for files that are not NIfTI
        raise DataError(f"{path}: not a NIfTI image ({describe_error(err)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def spatial_shape(img: nib.Nifti1Image, path: str | Path) -> tuple[int, int, int]:
    """The (X, Y, Z) shape of a 3D volume; trailing singleton dimensions are tolerated.

    Raises:
        DataError: the image is 2D or has more than one frame/channel (4D).
    """
    shape = tuple(int(s) for s in img.shape)
    squeezed = shape[:3] if len(shape) > 3 and all(s == 1 for s in shape[3:]) else shape
    if len(squeezed) != 3:
        kind = "2D" if len(squeezed) < 3 else f"{len(squeezed)}D"
        raise DataError(f"{path}: expected a 3D volume (X, Y, Z), got a {kind} image of shape {shape}")
    if min(squeezed) < 1:
        raise DataError(f"{path}: empty image of shape {shape}")
    return squeezed  # type: ignore[return-value]


def true_affine(img: nib.Nifti1Image) -> np.ndarray:
    """The voxel-to-world affine (4, 4) with the voxel spacing of the header's pixdim.

    ACDC's files carry a unit-scaled sform while the true spacing is in pixdim (qform code 0), so the
    affine nibabel returns claims 1 mm voxels. The direction and origin of the affine are kept and its
    columns are rescaled to pixdim, which is what ITK-based tools (nnU-Net) read.
    """
    affine = np.array(img.affine, dtype=np.float64)
    zooms = np.array(img.header.get_zooms()[:3], dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.all(zooms > 0) and np.all(norms > 0) and not np.allclose(norms, zooms, rtol=1e-4):
        affine[:3, :3] = affine[:3, :3] / norms * zooms
    return affine


def read_volume(path: str | Path, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        dtype: dtype of the returned array.

    Returns:
        ``(array (X, Y, Z), affine (4, 4))`` with the affine from :func:`true_affine`.

    Raises:
        DataError: unreadable, truncated, not NIfTI, or not 3D; the message names the file.
    """
    img = open_nifti(path)
    shape = spatial_shape(img, path)
    try:
        data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise DataError(f"{path}: corrupt or truncated file ({describe_error(err)})") from None
    return data, true_affine(img)


def check_finite(values: np.ndarray, path: str | Path) -> None:
    """Refuse a volume with NaN or infinite voxels (they would turn the whole training loss into NaN).

    Raises:
        DataError: naming the file and how many voxels are affected.
    """
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise DataError(f"{path}: {bad} of {values.size} voxels are NaN or infinite (fix or remove the file)")


def check_label_values(values: np.ndarray, path: str | Path) -> None:
    """Refuse label values outside 0..3 or non-integer labels; ``values`` are the unique values found.

    Raises:
        DataError: naming the file and the unexpected values.
    """
    values = np.asarray(values)
    bad = [v for v in values.tolist() if v not in LABEL_VALUES]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8])
        raise DataError(f"{path}: unexpected label values {shown} (expected 0 background, 1 RV, 2 MYO, 3 LV)")


def check_pair(image: nib.Nifti1Image, label: nib.Nifti1Image, image_path: Path, label_path: Path) -> None:
    """Refuse a label whose shape or affine differs from its image's.

    Raises:
        DataError: naming the label file, both shapes or the largest affine difference.
    """
    ishape, lshape = spatial_shape(image, image_path), spatial_shape(label, label_path)
    if ishape != lshape:
        raise DataError(
            f"{label_path}: label shape {lshape} differs from image shape {ishape} ({image_path.name})"
        )
    diff = float(np.abs(true_affine(image) - true_affine(label)).max())
    if diff > 1e-3:
        raise DataError(
            f"{label_path}: label affine differs from the image's by up to {diff:.4g} ({image_path.name})"
        )


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, compresslevel: int = 6) -> None:
    """Write a NIfTI volume atomically with byte-identical output for identical inputs.

    The gzip header of ``.nii.gz`` gets mtime 0 and no file name, so the bytes depend only on the data.

    Args:
        path: destination (``.nii.gz`` compresses, ``.nii`` does not).
        array: voxel data (X, Y, Z), stored with its own dtype.
        affine: (4, 4) voxel-to-world affine, written as both sform and qform (code 1, scanner).
        compresslevel: gzip level (1 fast .. 9 small).
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    raw = img.to_bytes()
    data = gzip.compress(raw, compresslevel=compresslevel, mtime=0) if str(path).endswith(".gz") else raw
    atomic_write_bytes(Path(path), data)
