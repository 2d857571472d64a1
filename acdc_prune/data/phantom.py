"""Phantom generator: ACDC-layout data sets of synthetic short-axis cine MRI with five pathology groups.

The model is described in ``docs/phantom.md``. In short: every patient is a chest cross-section (body,
subcutaneous fat, chest-wall muscle, lungs, spine, descending aorta, liver towards the apex) with a
heart made of a truncated-ellipsoid left ventricle (blood pool inside a myocardial wall) and a
crescent-shaped right ventricle wrapped around the septum, drawn with partial volume in and through
the slice plane, then imaged with a coil bias field, Rician noise and a patient-specific intensity scale.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from acdc_prune.data.nifti import write_nifti
from acdc_prune.errors import DataError

GENERATOR_VERSION = 1
"""Bumped whenever the generator's output changes, so cached phantoms are regenerated."""

GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
"""Pathology groups, assigned to patients in this rotation."""

_SUBSAMPLES = (-1 / 3, 0.0, 1 / 3)
"""Positions inside a slice (in slice thicknesses) averaged for through-plane partial volume."""

# Mean intensities relative to blood; muscle, liver and soft tissue overlap the myocardium, fat and the
# aorta overlap the blood pools, so no structure is given away by its grey value alone.
_TISSUE = {
    "blood": 1.0,
    "myocardium": 0.30,
    "fat": 0.82,
    "muscle": 0.34,
    "soft": 0.46,
    "lung": 0.07,
    "liver": 0.42,
    "spine": 0.55,
    "aorta": 0.92,
}


@dataclass(frozen=True)
class HeartParams:
    """Size, function and shape of one patient's heart (lengths in mm, angles in radians).

    Attributes:
        lv_radius: ED endocardial radius at the base.
        wall: ED myocardial wall thickness at the base.
        lv_length: apex-to-base length of the LV at ED.
        ef: LV ejection fraction.
        rv_depth: ED crescent depth of the RV cavity at its middle, at the base.
        rv_span: half angle of the RV crescent around the LV.
        rv_ef: RV ejection fraction.
        shortening: long-axis shortening at ES (share of the length).
        septal_extra: extra septal thickness as a share of the wall (HCM asymmetric hypertrophy).
        infarct_depth: share of the wall lost in the infarcted segment (MINF); 0 for none.
        infarct_angle: centre of the infarcted segment.
    """

    lv_radius: float
    wall: float
    lv_length: float
    ef: float
    rv_depth: float
    rv_span: float
    rv_ef: float
    shortening: float
    septal_extra: float
    infarct_depth: float
    infarct_angle: float


def sample_heart(group: str, rng: np.random.Generator) -> HeartParams:
    """Draw heart parameters for a pathology group (``NOR``, ``MINF``, ``DCM``, ``HCM`` or ``RV``)."""
    u = rng.uniform
    lv_radius, wall, ef = u(21.0, 25.0), u(7.0, 9.0), u(0.55, 0.68)
    rv_depth, rv_span, rv_ef = u(11.0, 15.0), np.radians(u(60.0, 72.0)).item(), u(0.45, 0.60)
    lv_length, septal_extra, infarct_depth = u(75.0, 92.0), 0.0, 0.0
    if group == "MINF":
        lv_radius, ef, infarct_depth = u(25.0, 29.0), u(0.25, 0.40), u(0.45, 0.6)
    elif group == "DCM":
        lv_radius, wall, ef, rv_ef = u(30.0, 35.0), u(5.5, 7.0), u(0.10, 0.28), u(0.30, 0.45)
        lv_length *= 1.12
    elif group == "HCM":
        lv_radius, wall, ef, septal_extra = u(16.0, 20.0), u(12.0, 15.0), u(0.68, 0.80), u(0.15, 0.40)
    elif group == "RV":
        rv_depth, rv_span, rv_ef = u(21.0, 28.0), np.radians(u(78.0, 90.0)).item(), u(0.18, 0.33)
    elif group != "NOR":
        raise ValueError(f"unknown group {group!r}; expected one of {', '.join(GROUPS)}")
    return HeartParams(
        lv_radius=lv_radius,
        wall=wall,
        lv_length=lv_length,
        ef=ef,
        rv_depth=rv_depth,
        rv_span=rv_span,
        rv_ef=rv_ef,
        shortening=0.25 * ef,
        septal_extra=septal_extra,
        infarct_depth=infarct_depth,
        infarct_angle=float(rng.choice([np.pi / 2, -np.pi / 2, 0.0])) + u(-0.3, 0.3),
    )


def _profile(u: np.ndarray) -> np.ndarray:
    """Quarter-ellipse radius profile of a truncated ellipsoid: 0 at the apex (u=0), 1 at the base (u>=1)."""
    v = np.clip(u, 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - (1.0 - v) ** 2, 0.0, 1.0))


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _soft(sd: np.ndarray, pixel: float) -> np.ndarray:
    """Partial-volume membership from a signed distance in mm (negative inside), over one pixel."""
    return np.clip(0.5 - sd / pixel, 0.0, 1.0)


def _ellipse_sd(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """First-order signed distance (mm) to an axis-aligned ellipse with semi-axes a, b."""
    q = np.sqrt((x / a) ** 2 + (y / b) ** 2) + 1e-6
    grad = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2) / q + 1e-6
    return (q - 1.0) / grad


@dataclass(frozen=True)
class _Geometry:
    """Image grid of one patient: in-plane body coordinates (mm) of every pixel and slice positions."""

    bx: np.ndarray  # (X, Y) body x (towards the patient's left), mm
    by: np.ndarray  # (X, Y) body y (anterior), mm
    spacing: float  # in-plane pixel size, mm
    thickness: float  # slice spacing, mm
    heights: np.ndarray  # (Z * S,) distance of every sub-slice above the apex, mm
    affine: np.ndarray  # (4, 4)


def _random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _geometry(rng: np.random.Generator, heart: HeartParams, fov_mm: tuple[float, float]) -> _Geometry:
    spacing = float(np.round(rng.uniform(1.2, 1.9), 4))
    n_slices = int(rng.integers(6, 13))
    coverage = heart.lv_length * rng.uniform(1.0, 1.1)
    thickness = float(np.round(np.clip(coverage / n_slices, 5.0, 10.0), 1))
    nx, ny = (int(round(rng.uniform(*fov_mm) / spacing)) for _ in range(2))
    px = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * spacing
    py = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * spacing
    gx, gy = np.meshgrid(px, py, indexing="ij")
    phi = rng.uniform(-0.45, 0.45)
    centre = np.array([22.0, 12.0]) + rng.uniform(-15.0, 15.0, size=2)
    bx = np.cos(phi) * gx - np.sin(phi) * gy + centre[0]
    by = np.sin(phi) * gx + np.cos(phi) * gy + centre[1]
    top = heart.lv_length - rng.uniform(0.2, 0.6) * thickness
    slice_heights = top - thickness * np.arange(n_slices)
    heights = (slice_heights[:, None] + thickness * np.array(_SUBSAMPLES)[None, :]).ravel()
    rotation = np.diag([-1.0, -1.0, 1.0]) @ _random_rotation(rng, 0.5)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([spacing, spacing, thickness])
    affine[:3, 3] = rng.uniform(-150.0, 150.0, size=3).round(2)
    return _Geometry(bx.astype(np.float32), by.astype(np.float32), spacing, thickness, heights, affine)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    field = gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma_px)
    return field / (field.std() + 1e-6)


def _surroundings(
    rng: np.random.Generator, geo: _Geometry, heart: HeartParams
) -> list[tuple[str, np.ndarray]]:
    """Chest layers as (tissue, membership (X, Y, Z*S)) in drawing order, behind the heart."""
    u, pix = rng.uniform, geo.spacing
    bx, by = geo.bx[..., None], geo.by[..., None]
    a, b = u(135.0, 165.0), u(95.0, 120.0)
    fat, muscle = u(8.0, 18.0), u(8.0, 14.0)
    body = _ellipse_sd(bx, by, a, b)
    layers = [
        ("fat", _soft(body, pix)),
        ("muscle", _soft(_ellipse_sd(bx, by, a - fat, b - fat), pix)),
        ("soft", _soft(_ellipse_sd(bx, by, a - fat - muscle, b - fat - muscle), pix)),
    ]
    for side in (-1.0, 1.0):
        cx, cy = side * u(62.0, 78.0), u(-25.0, -5.0)
        layers.append(("lung", _soft(_ellipse_sd(bx - cx, by - cy, u(38.0, 50.0), u(60.0, 75.0)), pix)))
    spine_y = -b + u(28.0, 38.0)
    layers.append(("spine", _soft(np.hypot(bx, by - spine_y) - u(13.0, 17.0), pix)))
    aorta = np.hypot(bx - u(18.0, 28.0), by - spine_y - u(18.0, 26.0)) - u(9.0, 12.0)
    layers.append(("aorta", _soft(aorta, pix)))
    # The liver dome rises into the slices below the heart's mid-ventricle.
    dome = np.clip(1.0 - geo.heights / (0.55 * heart.lv_length), 0.0, 1.0)[None, None, :]
    liver = _ellipse_sd(bx - u(-70.0, -50.0), by - u(-40.0, -20.0), 25.0 + 70.0 * dome, 20.0 + 55.0 * dome)
    layers.append(("liver", _soft(liver, pix) * (dome > 0)))
    return layers


def _heart(geo: _Geometry, heart: HeartParams, phase: str, layout: dict[str, float]) -> dict[str, np.ndarray]:
    """Memberships (X, Y, Z) of the heart's parts at ``phase`` (``"ED"`` or ``"ES"``), sub-slices averaged."""
    # Only a box around the heart is computed: the largest reach of any part from the LV centre.
    reach = (
        heart.lv_radius * (1.0 + layout["ecc"])
        + heart.wall * (1.0 + heart.septal_extra)
        + heart.rv_depth
        + layout["rv_wall"]
        + layout["fat"]
        + np.hypot(layout["drift_x"], layout["drift_y"])
        + 3.0 * geo.spacing
    )
    near = np.hypot(geo.bx - layout["cx"], geo.by - layout["cy"]) < reach
    rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    n_slices = len(geo.heights) // len(_SUBSAMPLES)
    parts = {}
    for name, membership in _heart_box(geo, heart, phase, layout, box).items():
        full = np.zeros((*geo.bx.shape, n_slices), dtype=np.float32)
        full[box] = _average_subslices(membership)
        parts[name] = full
    return parts


def _heart_box(
    geo: _Geometry, heart: HeartParams, phase: str, layout: dict[str, float], box: tuple[slice, slice]
) -> dict[str, np.ndarray]:
    """Memberships (x, y, Z*S) of the heart's parts inside the pixel ``box`` of the grid."""
    pix, h = geo.spacing, geo.heights[None, None, :].astype(np.float32)
    shorten = heart.shortening if phase == "ES" else 0.0
    # ES: the base descends towards the fixed apex, so every slice sees a more basal level of a shorter LV.
    level = np.minimum(h / (1.0 - shorten), heart.lv_length)
    drift = 1.0 - level / heart.lv_length
    cx = layout["cx"] + layout["drift_x"] * drift
    cy = layout["cy"] + layout["drift_y"] * drift
    dx, dy = geo.bx[box][..., None] - cx, geo.by[box][..., None] - cy
    rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)

    to_rv = _wrap(theta - layout["rv_angle"])
    septum = np.exp(-0.5 * (to_rv / 0.6) ** 2)
    infarct = np.exp(-0.5 * (_wrap(theta - heart.infarct_angle) / 0.55) ** 2) * (heart.infarct_depth > 0)
    wall_ed = heart.wall * (1.0 + heart.septal_extra * septum) * (1.0 - heart.infarct_depth * infarct)
    ellipse = 1.0 + layout["ecc"] * np.cos(2.0 * (theta - layout["ecc_angle"]))
    r_ed = heart.lv_radius * ellipse
    if phase == "ES":
        # Cavity area shrinks with the EF; myocardial area is conserved, so the wall thickens; the
        # infarcted segment is akinetic and keeps its ED radius and thickness.
        r_es = r_ed * np.sqrt(1.0 - heart.ef)
        thick = np.sqrt(r_es**2 + (r_ed + wall_ed) ** 2 - r_ed**2) - r_es
        r_endo = r_es * (1.0 - infarct) + r_ed * infarct
        wall = thick * (1.0 - infarct) + wall_ed * infarct
        rv_depth = heart.rv_depth * (1.0 - heart.rv_ef)
    else:
        r_endo, wall, rv_depth = r_ed, wall_ed, heart.rv_depth
    apex_wall = 0.8 * heart.wall
    cavity_r = r_endo * _profile((level - apex_wall) / (heart.lv_length - apex_wall))
    epi_r = (r_endo + wall) * _profile(level / heart.lv_length)
    rv_shape = np.clip(np.cos(0.5 * np.pi * to_rv / heart.rv_span), 0.0, None) ** 0.7
    rv_r = epi_r + rv_depth * rv_shape * _profile((level - 0.3 * heart.lv_length) / (0.7 * heart.lv_length))
    rv_cavity = np.maximum(epi_r - rho, rho - rv_r)
    rv_wall_r = np.where(rv_r > epi_r + 0.5, rv_r + layout["rv_wall"], epi_r)
    fat_r = np.maximum(rv_wall_r, epi_r) + layout["fat"] * np.clip(
        np.sin(theta * 2 + layout["fat_phase"]), 0, 1
    )
    parts = {
        "pericardial_fat": _soft(rho - fat_r, pix),
        "rv_wall": _soft(rho - rv_wall_r, pix),
        "rv": _soft(rv_cavity, pix),
        "myocardium": _soft(rho - epi_r, pix),
        "lv": _soft(rho - cavity_r, pix),
    }
    papillary = np.zeros_like(rho)
    for offset in (2.3, -2.3):
        angle = layout["rv_angle"] + np.pi + offset * 0.45
        px, py = np.cos(angle) * 0.62 * cavity_r, np.sin(angle) * 0.62 * cavity_r
        radius = np.where(cavity_r > 8.0, np.float32(layout["papillary"]), np.float32(0.0))
        papillary = np.maximum(papillary, _soft(np.hypot(dx - px, dy - py) - radius, pix))
    parts["papillary"] = papillary * parts["lv"]
    return parts


def _average_subslices(membership: np.ndarray) -> np.ndarray:
    """(X, Y, Z*S) -> (X, Y, Z) mean over sub-slices; (X, Y, 1) layers constant in Z pass through."""
    x, y, zs = membership.shape
    if zs == 1:
        return membership
    return membership.reshape(x, y, zs // len(_SUBSAMPLES), len(_SUBSAMPLES)).mean(axis=-1)


def _render(
    rng: np.random.Generator,
    geo: _Geometry,
    surroundings: list[tuple[str, np.ndarray]],
    heart_parts: dict[str, np.ndarray],
    style: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite tissues into an image (int16) and a label volume (uint8), both (X, Y, Z)."""
    tissue_of = {
        "pericardial_fat": "fat",
        "rv_wall": "myocardium",
        "rv": "blood",
        "myocardium": "myocardium",
        "lv": "blood",
        "papillary": "myocardium",
    }
    layers = [(t, _average_subslices(m)) for t, m in surroundings]
    layers += [(tissue_of[name], m) for name, m in heart_parts.items()]
    image = np.zeros(layers[-1][1].shape, dtype=np.float32)
    for tissue, membership in layers:
        value = style["mean"][tissue] * (1.0 + style["texture"][tissue] * style["field"][tissue][..., None])
        image += membership * (value - image)
    label = _labels(heart_parts)
    image *= style["bias"]
    sigma = style["noise"]
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return np.clip(np.round(noisy * style["scale"]), 0, 32767).astype(np.int16), label


def _labels(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Labels (X, Y, Z) in drawing order: RV cavity, myocardium, LV cavity (papillary muscles count as LV)."""
    label = np.zeros(parts["lv"].shape, dtype=np.uint8)
    for name, value in (("rv", 1), ("myocardium", 2), ("lv", 3)):
        label[parts[name] > 0.5] = value
    return label


def _style(rng: np.random.Generator, geo: _Geometry) -> dict:
    """Patient-specific tissue means, textures, bias field, noise level and intensity scale."""
    shape = geo.bx.shape
    mean = {t: v * rng.uniform(0.92, 1.08) for t, v in _TISSUE.items()}
    fields = {t: _smooth_field(rng, shape, 5.0 / geo.spacing) for t in _TISSUE}
    texture = {t: (0.08 if t in ("blood", "myocardium") else 0.12) for t in _TISSUE}
    coil = np.array([rng.uniform(-60.0, 60.0), rng.uniform(60.0, 140.0)])
    width = rng.uniform(120.0, 200.0)
    falloff = np.exp(-((geo.bx - coil[0]) ** 2 + (geo.by - coil[1]) ** 2) / (2 * width**2))
    gradient = rng.uniform(-0.15, 0.15) * geo.bx / 150.0
    bias = (0.6 + 0.6 * falloff + gradient)[..., None]
    return {
        "mean": mean,
        "field": fields,
        "texture": texture,
        "bias": bias.astype(np.float32),
        "noise": rng.uniform(0.025, 0.05),
        "scale": rng.uniform(200.0, 900.0),
    }


def _heart_layout(rng: np.random.Generator) -> dict[str, float]:
    """Where the heart sits and its shape details, shared by ED and ES."""
    u = rng.uniform
    return {
        "cx": u(15.0, 30.0),
        "cy": u(5.0, 20.0),
        "drift_x": u(-8.0, 8.0),
        "drift_y": u(-8.0, 8.0),
        "rv_angle": np.radians(u(130.0, 160.0)).item(),
        "ecc": u(0.0, 0.08),
        "ecc_angle": u(-np.pi, np.pi),
        "rv_wall": u(2.5, 4.0),
        "fat": u(1.0, 5.0),
        "fat_phase": u(-np.pi, np.pi),
        "papillary": u(2.5, 4.0),
    }


def _info_cfg(group: str, es: int, n_frames: int, rng: np.random.Generator) -> str:
    height, weight = rng.uniform(150.0, 195.0), rng.uniform(50.0, 110.0)
    return (
        f"ED: 1\nES: {es}\nGroup: {group}\nHeight: {height:.1f}\nNbFrame: {n_frames}\nWeight: {weight:.1f}\n"
    )


def synthesize_patient(
    folder: Path, index: int, seed: int, fov_mm: tuple[float, float] = (230.0, 300.0)
) -> None:
    """Write one phantom patient (Info.cfg, ED and ES images and labels) into ``folder``.

    Args:
        folder: ``.../patientNNN`` (created); its name prefixes the files.
        index: 0-based patient index; the group is ``GROUPS[index % 5]``.
        seed: data set seed; patient ``index`` of a seed is the same whatever the data set size.
        fov_mm: range of the in-plane field of view; the matrix size is field of view / spacing.
    """
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    group = GROUPS[index % len(GROUPS)]
    heart = sample_heart(group, rng)
    geo = _geometry(rng, heart, fov_mm)
    surroundings = _surroundings(rng, geo, heart)
    layout = _heart_layout(rng)
    style = _style(rng, geo)
    n_frames = int(rng.choice([25, 28, 30, 35]))
    es = int(round(n_frames * rng.uniform(0.32, 0.45)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Info.cfg").write_text(_info_cfg(group, es, n_frames, rng), encoding="utf-8")
    for frame, phase in ((1, "ED"), (es, "ES")):
        image, label = _render(rng, geo, surroundings, _heart(geo, heart, phase, layout), style)
        stem = folder / f"{folder.name}_frame{frame:02d}"
        write_nifti(f"{stem}.nii.gz", image, geo.affine, compresslevel=1)
        write_nifti(f"{stem}_gt.nii.gz", label, geo.affine, compresslevel=1)


def synthesize_dataset(
    out: str | Path, n_patients: int, seed: int, fov_mm: tuple[float, float] = (230.0, 300.0)
) -> Path:
    """Write an ACDC-layout phantom data set: ``out/patientNNN/{Info.cfg, *_frameXX.nii.gz, *_gt.nii.gz}``.

    Groups rotate through NOR, MINF, DCM, HCM, RV. The same ``(n_patients, seed, fov_mm)`` gives
    byte-identical files.

    Args:
        out: destination folder (created; existing patient folders are overwritten).
        n_patients: number of patients (ED + ES volumes each).
        seed: random seed.
        fov_mm: range of the in-plane field of view in mm; smaller values give smaller matrices (tests).

    Returns:
        ``out`` as a Path.
    """
    if n_patients < 1:
        raise DataError(f"{out}: a phantom needs at least 1 patient, got {n_patients}")
    out = Path(out)
    for index in range(n_patients):
        synthesize_patient(out / f"patient{index + 1:03d}", index, seed, fov_mm)
    return out


def phantom_root(cache_dir: str | Path, n_patients: int, seed: int) -> Path:
    """The phantom data set for ``(n_patients, seed)``, generated once under ``cache_dir`` and reused.

    The folder is ``<cache_dir>/phantom/v<GENERATOR_VERSION>-n<n>-s<seed>``. It is generated in a
    temporary sibling and renamed into place, so an interrupted run never leaves a half data set, and
    two processes racing to create it both end up with one complete copy.
    """
    parent = Path(cache_dir) / "phantom"
    final = parent / f"v{GENERATOR_VERSION}-n{n_patients}-s{seed}"
    if final.is_dir():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
    try:
        synthesize_dataset(tmp, n_patients, seed)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
