"""Data layer: ACDC and nnU-Net raw layouts, patient-level splits, MONAI transforms, data check, phantom."""

from acdc_prune.data.check import DatasetReport, check_dataset
from acdc_prune.data.datasets import TrainSliceDataset, VolumeDataset, invert_to_original, load_label
from acdc_prune.data.phantom import phantom_root, synthesize_dataset
from acdc_prune.data.records import VolumeRecord, discover, load_records
from acdc_prune.data.split import save_split, split_records

__all__ = [
    "DatasetReport",
    "TrainSliceDataset",
    "VolumeDataset",
    "VolumeRecord",
    "check_dataset",
    "discover",
    "invert_to_original",
    "load_label",
    "load_records",
    "phantom_root",
    "save_split",
    "split_records",
    "synthesize_dataset",
]
