"""A corpus of broken inputs, each driven through the real command line.

Every case builds its broken input in ``tmp_path`` and runs one acdc-prune command on it. The bar
for each: a non-zero exit, one line of output that starts with ``error:`` and names the problem (a
key phrase per case), no traceback, nothing written (the listing of every folder involved is
unchanged), and no code run from a file (a marker file that hostile inputs try to create never
appears).
"""

from __future__ import annotations

import gzip
import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from acdc_prune.cli import app
from acdc_prune.config import config_from_dict
from acdc_prune.data.nifti import write_nifti
from acdc_prune.engine.checkpoints import read_checkpoint
from acdc_prune.engine.trainer import train
from acdc_prune.experiments.prune import prune_run
from acdc_prune.pruning import PruningPlan

TINY = {
    "data": {"val_fraction": 0.2, "target_spacing": [3.0, 3.0], "patch_size": [64, 64]},
    "model": {"features": [8, 16]},
    "training": {
        "epochs": 1,
        "batch_size": 4,
        "iterations_per_epoch": 2,
        "checkpoint_epochs": [1],
        "num_threads": 1,
    },
    "pruning": {"retrain_epochs": 0, "rewind_to": "epoch1"},
    "evaluation": {"batch_size": 8, "overlays": 0, "latency_repeats": 1, "latency_warmup": 0},
    "logging": {"experiment": "t", "progress": False, "tensorboard": False},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_phantom):
    """A one-epoch run on the phantom (best.pt, epoch1.pt, last.pt) and a pruned child folder of it."""
    raw = {**TINY, "data": {**TINY["data"], "root": str(tiny_phantom)}}
    raw["logging"] = {**TINY["logging"], "runs_dir": str(tmp_path_factory.mktemp("trained"))}
    run = train(config_from_dict(raw)).run_dir
    pruned = prune_run(run, {"default": 0.5}, retrain_epochs=0, out_dir=run.parent / "pruned").out_dir
    return run, pruned


class Payload:
    """Unpickling this calls os.system: a checkpoint crafted to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@dataclass
class Env:
    """Paths a case builds on; ``root`` (``tmp_path``) and the trained run are watched for writes."""

    root: Path
    phantom: Path
    run: Path
    pruned: Path

    @property
    def marker(self) -> Path:
        return self.root / "pwned"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def config(self, **sections) -> Path:
        """The tiny config with ``runs_dir`` in ``root``; ``sections`` replace keys of its sections."""
        raw = {name: {**TINY[name], **sections.get(name, {})} for name in TINY}
        raw["logging"]["runs_dir"] = str(self.runs)
        return self.write("config.yaml", yaml.safe_dump(raw))

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def data(self) -> Path:
        """A writable copy of the phantom."""
        copy = self.root / "data"
        if not copy.exists():
            shutil.copytree(self.phantom, copy)
        return copy

    def train(self, data: Path | None = None, *extra: str) -> list[str]:
        return ["train", "-c", str(self.config()), "--data", str(data or self.data()), *extra]

    def image(self, frame: str = "01") -> Path:
        return self.data() / "patient001" / f"patient001_frame{frame}.nii.gz"

    def label(self) -> Path:
        return self.data() / "patient001" / "patient001_frame01_gt.nii.gz"

    def checkpoint(self, name: str = "best.pt", source: Path | None = None) -> dict:
        return read_checkpoint((source or self.run) / name)

    def save(self, checkpoint: object, name: str = "model.pt") -> Path:
        path = self.root / name
        torch.save(checkpoint, path)
        return path

    def sweep(self, **spec) -> list[str]:
        raw = {"name": "s", "config": str(self.config()), "baseline": str(self.run), **spec}
        return ["sweep", "-c", str(self.write("sweep.yaml", yaml.safe_dump(raw)))]


CASES: list = []


def case(phrase: str) -> Callable:
    """Register a case: a function of :class:`Env` returning CLI arguments; the error must hold ``phrase``."""

    def register(make: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
        CASES.append(pytest.param(make, phrase, id=make.__name__.replace("_", "-")))
        return make

    return register


def _rewrite_image(env: Env, change: Callable[[np.ndarray], np.ndarray]) -> None:
    image = nib.load(str(env.image()))
    write_nifti(env.image(), change(np.asarray(image.dataobj, dtype=np.float32)), image.affine)


def _rewrite_label(env: Env, change: Callable[[np.ndarray], np.ndarray], affine_shift: float = 0.0) -> None:
    label = nib.load(str(env.label()))
    affine = label.affine.copy()
    affine[0, 3] += affine_shift
    write_nifti(env.label(), change(np.asarray(label.dataobj, dtype=np.float32)), affine)


def _info(env: Env, text: str) -> None:
    (env.data() / "patient001" / "Info.cfg").write_text(text)


# --- data (acdc-prune train --data) --------------------------------------------------------------


@case("corrupt or truncated")
def image_corrupt_gzip(env):
    env.image().write_bytes(b"\x1f\x8b\x08\x00" + b"not deflate data" * 40)
    return env.train()


@case("corrupt or truncated")
def image_truncated_gzip(env):
    data = env.image().read_bytes()
    env.image().write_bytes(data[: len(data) // 2])
    return env.train()


@case("not a NIfTI image")
def image_gzipped_text(env):
    env.image().write_bytes(gzip.compress(b"this is a text file, not an image\n" * 40))
    return env.train()


@case("patient001_frame01.nii.gz: ")
def image_empty_file(env):
    env.image().write_bytes(b"")
    return env.train()


@case("voxels are NaN or infinite")
def image_with_nan(env):
    _rewrite_image(env, lambda a: np.where(a > np.median(a), np.nan, a))
    return env.train()


@case("voxels are NaN or infinite")
def image_with_inf(env):
    _rewrite_image(env, lambda a: np.where(a == a.max(), np.inf, a))
    return env.train()


@case("expected a 3D volume (X, Y, Z), got a 2D image")
def image_2d(env):
    _rewrite_image(env, lambda a: a[..., 0])
    return env.train()


@case("expected a 3D volume (X, Y, Z), got a 4D image")
def image_4d(env):
    _rewrite_image(env, lambda a: np.stack([a, a], axis=-1))
    return env.train()


@case("differs from image shape")
def label_shape_mismatch(env):
    _rewrite_label(env, lambda a: a[:-3])
    return env.train()


@case("label affine differs from the image's")
def label_affine_mismatch(env):
    _rewrite_label(env, lambda a: a, affine_shift=5.0)
    return env.train()


@case("unexpected label values 4")
def label_value_4(env):
    _rewrite_label(env, lambda a: np.where(a == 3, 4, a))
    return env.train()


@case("unexpected label values -1")
def label_value_negative(env):
    _rewrite_label(env, lambda a: np.where(a == 1, -1, a))
    return env.train()


@case("unexpected label values 1.5")
def label_value_fractional(env):
    _rewrite_label(env, lambda a: np.where(a == 2, 1.5, a))
    return env.train()


@case("data folder is empty")
def data_folder_empty(env):
    (env.root / "empty").mkdir()
    return env.train(env.root / "empty")


@case("data folder not found")
def data_folder_missing(env):
    return env.train(env.root / "nowhere")


@case("neither an ACDC folder")
def data_folder_of_other_files(env):
    (env.root / "other").mkdir()
    (env.root / "other" / "notes.txt").write_text("hello\n")
    return env.train(env.root / "other")


@case("no <case>_0000.nii.gz images found")
def nnunet_folder_without_images(env):
    (env.root / "nnunet" / "imagesTr").mkdir(parents=True)
    return env.train(env.root / "nnunet")


@case("Info.cfg not found")
def info_cfg_missing(env):
    (env.data() / "patient001" / "Info.cfg").unlink()
    return env.train()


@case("missing key 'ED'")
def info_cfg_without_ed(env):
    _info(env, "ES: 12\nGroup: NOR\n")
    return env.train()


@case("missing key 'ES'")
def info_cfg_without_es(env):
    _info(env, "ED: 1\nGroup: NOR\n")
    return env.train()


@case("ED must be a positive frame number, got 'first'")
def info_cfg_frame_not_a_number(env):
    _info(env, "ED: first\nES: 12\n")
    return env.train()


@case("ED and ES name the same frame")
def info_cfg_same_frames(env):
    _info(env, "ED: 1\nES: 1\n")
    return env.train()


@case("is not 'Key: value'")
def info_cfg_malformed_line(env):
    _info(env, "ED 1\nES 12\n")
    return env.train()


@case("(from Info.cfg) not found")
def es_frame_missing(env):
    es = next(p for p in env.image().parent.glob("*_frame??.nii.gz") if "frame01" not in p.name)
    es.unlink()
    return env.train()


@case("label of the ED frame not found")
def label_file_missing(env):
    env.label().unlink()
    return env.train()


@case("needs at least 2 patients, found 1")
def single_patient(env):
    only = env.root / "single"
    shutil.copytree(env.phantom / "patient001", only / "patient001")
    return env.train(only)


# --- configs and overrides (acdc-prune train) ----------------------------------------------------


@case("YAML syntax error at line 3")
def config_yaml_syntax_error(env):
    return ["train", "-c", str(env.write("bad.yaml", "training:\n  epochs: [1, 2\n"))]


@case("could not determine a constructor for the tag")
def config_python_tag(env):
    text = f"training: !!python/object/apply:os.system [{shlex.quote(f'touch {env.marker}')!r}]\n"
    return ["train", "-c", str(env.write("hostile.yaml", text))]


@case("not a text file")
def config_binary_file(env):
    (env.root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x80binary")
    return ["train", "-c", str(env.root / "binary.yaml")]


@case("expected a mapping of sections")
def config_not_a_mapping(env):
    return ["train", "-c", str(env.write("list.yaml", "- 1\n- 2\n"))]


@case("config file")
def config_missing(env):
    return ["train", "-c", str(env.root / "missing.yaml")]


@case("unknown config key 'training.epoch': did you mean 'training.epochs'?")
def config_key_typo(env):
    return ["train", "-c", str(env.config(training={"epoch": 3}))]


@case("unknown config key 'trainig': did you mean 'training'?")
def config_section_typo(env):
    return ["train", "-c", str(env.write("typo.yaml", "trainig:\n  epochs: 3\n"))]


@case("training.epochs: expected an integer, got 'five'")
def config_wrong_type(env):
    return ["train", "-c", str(env.config(training={"epochs": "five"}))]


@case("data.patch_size: expected a list of int, got 64")
def config_scalar_for_a_list(env):
    return ["train", "-c", str(env.config(data={"patch_size": 64}))]


@case("must look like section.key=value")
def override_without_value(env):
    return [*env.train(), "--set", "training.epochs"]


@case("training.lr: NaN is not a valid value")
def override_nan(env):
    return [*env.train(), "--set", "training.lr=.nan"]


@case("training.epochs: -1 is out of range (must be >= 1)")
def override_out_of_range(env):
    return [*env.train(), "--set", "training.epochs=-1"]


@case("model.name: 'resnet' is not one of")
def unknown_model(env):
    return [*env.train(), "--set", "model.name=resnet"]


@case("is not divisible by the model's total stride")
def patch_not_divisible(env):
    return [*env.train(), "--set", "data.patch_size=[63, 63]"]


@case("training.device: 'tpu' is not a device")
def unknown_device(env):
    return [*env.train(), "--set", "training.device=tpu"]


@case("the loss would be constant")
def zero_loss_weights(env):
    return [*env.train(), "--set", "training.dice_weight=0", "--set", "training.ce_weight=0"]


@case("logging.experiment '../escape' is not allowed")
def experiment_name_escapes(env):
    return [*env.train(), "--set", "logging.experiment=../escape"]


@case("is not allowed: use letters, digits, '.', '_' and '-' (no '/' or '..')")
def experiment_name_absolute(env):
    return [*env.train(), "--set", f"logging.experiment={env.root / 'abs'}"]


# --- ratios files (acdc-prune prune --ratios) ----------------------------------------------------


def _prune(env: Env, ratios_text: str, *extra: str) -> list[str]:
    return ["prune", str(env.run), "--ratios", str(env.write("ratios.yaml", ratios_text)), *extra]


@case("YAML syntax error")
def ratios_yaml_syntax_error(env):
    return _prune(env, "default: [0.5\n")


@case("ratios.yaml.default: 1.5 is out of range (must be < 1.0)")
def ratios_above_one(env):
    return _prune(env, "default: 1.5\n")


@case("ratios.yaml.encoders.1: -0.1 is out of range (must be >= 0.0)")
def ratios_negative(env):
    return _prune(env, "default: 0.5\nencoders.1: -0.1\n")


@case("ratios.yaml.default: expected a number, got 'abc'")
def ratios_not_a_number(env):
    return _prune(env, "default: abc\n")


@case("ratios.yaml.default: NaN is not a valid value")
def ratios_nan(env):
    return _prune(env, "default: .nan\n")


@case("ratios.yaml.default: inf is out of range")
def ratios_infinite(env):
    return _prune(env, "default: .inf\n")


@case("encoders.9")
def ratios_unknown_block(env):
    return _prune(env, "default: 0.5\nencoders.9: 0.5\n")


@case("expected a mapping of block prefixes to ratios")
def ratios_not_a_mapping(env):
    return _prune(env, "- 0.5\n")


@case("expected a mapping of block prefixes to ratios")
def ratios_empty_file(env):
    return _prune(env, "")


@case("could not determine a constructor for the tag")
def ratios_python_tag(env):
    return _prune(env, f"default: !!python/object/apply:os.system ['touch {env.marker}']\n")


# --- checkpoints and run folders (evaluate, prune, inspect, train --resume) ----------------------


@case("does not fit model 'unet'")
def checkpoint_of_another_architecture(env):
    checkpoint = env.checkpoint()
    checkpoint["config"]["model"]["features"] = [8, 24]
    return ["evaluate", str(env.save(checkpoint))]


@case("it is truncated or not a PyTorch file")
def checkpoint_truncated(env):
    data = (env.run / "best.pt").read_bytes()
    (env.root / "cut.pt").write_bytes(data[: len(data) // 2])
    return ["evaluate", str(env.root / "cut.pt")]


@case("is not an acdc-prune checkpoint")
def checkpoint_plain_state_dict(env):
    return ["evaluate", str(env.save(env.checkpoint()["model"]))]


@case("it is not a PyTorch checkpoint")
def checkpoint_text_file(env):
    return ["evaluate", str(env.write("notes.pt", "these are notes, not weights\n"))]


@case("it is truncated or not a PyTorch file")
def checkpoint_empty_file(env):
    return ["evaluate", str(env.write("empty.pt", ""))]


@case("contains pickled objects that are not plain tensors (refused for safety)")
def checkpoint_running_code(env):
    return ["evaluate", str(env.save({**env.checkpoint(), "model": Payload(env.marker)}))]


@case("refused for safety")
def resume_from_a_checkpoint_running_code(env):
    run = env.root / "hostile-run"
    run.mkdir()
    shutil.copy(env.run / "config.yaml", run / "config.yaml")
    torch.save({**env.checkpoint("last.pt"), "optimizer": Payload(env.marker)}, run / "last.pt")
    return ["train", "--resume", str(run), "--set", "training.epochs=2"]


@case("has checkpoint version 2; this version reads 1")
def checkpoint_from_a_newer_version(env):
    return ["evaluate", str(env.save({**env.checkpoint(), "version": 2}))]


@case("its pruning plan does not apply to the model")
def pruning_plan_for_another_model(env):
    checkpoint = env.checkpoint(source=env.pruned)
    plan = PruningPlan.from_json(checkpoint["plan"])
    checkpoint["plan"] = PruningPlan.from_dict({**plan.to_dict(), "model_class": "BasicUNet"}).to_json()
    return ["evaluate", str(env.save(checkpoint))]


@case("the pruning plan is not valid JSON")
def pruning_plan_truncated(env):
    checkpoint = env.checkpoint(source=env.pruned)
    checkpoint["plan"] = checkpoint["plan"][: len(checkpoint["plan"]) // 2]
    return ["evaluate", str(env.save(checkpoint))]


@case("does not exist")
def checkpoint_missing(env):
    return ["evaluate", str(env.root / "nothing.pt")]


@case("has no best.pt (checkpoints there: none)")
def prune_a_folder_without_checkpoints(env):
    (env.root / "not-a-run").mkdir()
    ratios = env.write("ratios.yaml", "default: 0.5\n")
    return ["prune", str(env.root / "not-a-run"), "--ratios", str(ratios)]


@case("has no epoch7.pt (checkpoints there: best, epoch1, last)")
def rewind_to_a_missing_checkpoint(env):
    return _prune(env, "default: 0.5\n", "--rewind", "epoch7")


@case("contradict each other")
def rewind_and_random_reinit(env):
    return _prune(env, "default: 0.5\n", "--rewind", "epoch1", "--reinit", "random")


@case("re-initialisation 'rewnd' is not one of none, random, rewind")
def unknown_reinit(env):
    return _prune(env, "default: 0.5\n", "--reinit", "rewnd")


@case("is already pruned and its folder keeps no early checkpoints")
def rewind_a_pruned_model(env):
    ratios = env.write("ratios.yaml", "default: 0.5\n")
    return ["prune", str(env.pruned), "--ratios", str(ratios), "--rewind", "epoch1"]


@case("pruning.steps needs a target")
def prune_in_steps_without_a_target(env):
    ratios = env.write("ratios.yaml", "default: 0.5\n")
    return ["prune", str(env.run), "--ratios", str(ratios), "--steps", "2"]


@case("has already trained 1 epochs; set training.epochs above that")
def resume_a_finished_run(env):
    return ["train", "--resume", str(env.run)]


@case("already exists; choose another output folder")
def evaluate_into_an_existing_folder(env):
    (env.root / "taken").mkdir()
    return ["evaluate", str(env.run), "--out", str(env.root / "taken")]


@case("has no epoch9.pt")
def inspect_a_missing_checkpoint(env):
    return ["inspect", str(env.run), "--checkpoint", "epoch9"]


# --- sweeps (acdc-prune sweep) -------------------------------------------------------------------


@case("modes[0]: 'prune' is not one of none, random, rewind")
def sweep_unknown_mode(env):
    return env.sweep(modes=["prune"])


@case("unknown config key 'ratio': did you mean 'ratios'?")
def sweep_unknown_key(env):
    return env.sweep(ratio={"half": {"default": 0.5}})


@case("sweep name '../escape' is not allowed")
def sweep_name_escapes(env):
    return env.sweep(name="../escape")


@case("ratios setting name 'a/b' is not allowed")
def sweep_setting_name_with_a_slash(env):
    return env.sweep(ratios={"a/b": {"default": 0.5}})


@case("the sweep has no arms")
def sweep_without_arms(env):
    return env.sweep(modes=[])


@case("ratios.half.default: 1.5 is out of range")
def sweep_ratio_out_of_range(env):
    return env.sweep(ratios={"half": {"default": 1.5}})


@case("could not determine a constructor for the tag")
def sweep_python_tag(env):
    text = f"name: !!python/object/apply:os.system ['touch {env.marker}']\n"
    return ["sweep", "-c", str(env.write("sweep.yaml", text))]


@case("has no best.pt")
def sweep_baseline_without_checkpoints(env):
    (env.root / "empty-run").mkdir()
    return env.sweep(baseline=str(env.root / "empty-run"))


@case("is truncated or not valid JSON")
def sweep_with_a_truncated_result(env):
    sweep_root = env.runs / "t" / "s"
    (sweep_root / "baseline_eval").mkdir(parents=True)
    (sweep_root / "baseline_eval" / "summary.json").write_text("{}\n")
    (sweep_root / "arms" / "half-none").mkdir(parents=True)
    (sweep_root / "arms" / "half-none" / "result.json").write_text('{"meta": {"params": {"bef')
    return env.sweep(ratios={"half": {"default": 0.5}}, modes=["none"])


@case("baseline_eval/summary.json is truncated or not valid JSON")
def sweep_with_a_truncated_summary(env):
    (env.runs / "t" / "s" / "baseline_eval").mkdir(parents=True)
    (env.runs / "t" / "s" / "baseline_eval" / "summary.json").write_text('{"mean_dice": 0.')
    return env.sweep(ratios={"half": {"default": 0.5}}, modes=["none"])


def _listing(*folders: Path) -> list[tuple[str, int]]:
    """Every path under ``folders`` with its modification time (files) or 0 (folders)."""
    return sorted(
        (str(path), 0 if path.is_dir() else path.stat().st_mtime_ns)
        for folder in folders
        for path in folder.rglob("*")
    )


@pytest.mark.parametrize(("make", "phrase"), CASES)
def test_bad_input_is_refused_in_one_line(make, phrase, trained, tiny_phantom, tmp_path):
    env = Env(tmp_path, tiny_phantom, *trained)
    args = make(env)
    before = _listing(tmp_path, env.run.parent)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and phrase in lines[0], lines[0]
    assert _listing(tmp_path, env.run.parent) == before
    assert not env.marker.exists()
