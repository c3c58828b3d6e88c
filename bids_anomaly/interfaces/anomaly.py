"""The model stage as a Nipype interface: channels -> anomaly map and thresholded mask."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _ScoreAnomalyInputSpec(BaseInterfaceInputSpec):
    channel_files = InputMultiObject(File(exists=True), mandatory=True,
                                     desc="template-space images in the model's channel order")
    mask_file = File(exists=True, mandatory=True, desc="brain mask in template space")
    model_dir = Directory(exists=True, mandatory=True, nohash=True, desc="model directory")
    model_checksum = traits.Str(mandatory=True, desc="checksum of the weights (cache key)")
    device = traits.Str("cpu", usedefault=True, nohash=True, desc="torch device")


class _ScoreAnomalyOutputSpec(TraitedSpec):
    anomaly_map = File(exists=True, desc="voxel-wise anomaly score (float32)")
    anomaly_mask = File(exists=True, desc="scores above the calibrated threshold (uint8)")
    threshold = traits.Float(desc="the calibrated threshold used")


class ScoreAnomaly(SimpleInterface):
    """Score one subject with a trained model and threshold at its calibrated level."""

    input_spec = _ScoreAnomalyInputSpec
    output_spec = _ScoreAnomalyOutputSpec

    def _run_interface(self, runtime):
        import torch

        from bids_anomaly.models import SubjectImages, load_model
        from bids_anomaly.postprocessing.thresholds import apply_threshold

        model, card = load_model(self.inputs.model_dir)
        subject = SubjectImages("subject", list(self.inputs.channel_files), self.inputs.mask_file)
        image, mask = subject.load(self.inputs.device)
        with torch.no_grad():
            anomaly_map = model.score(image, mask).cpu().numpy().astype(np.float32)
        mask_np = mask.cpu().numpy()
        reference = nib.load(self.inputs.mask_file)
        paths = {
            "anomaly_map": (anomaly_map, np.float32),
            "anomaly_mask": (apply_threshold(anomaly_map, mask_np, card.threshold), np.uint8),
        }
        for key, (data, dtype) in paths.items():
            out = nib.Nifti1Image(data.astype(dtype), reference.affine, reference.header)
            out.set_data_dtype(dtype)
            self._results[key] = os.path.join(runtime.cwd, f"{key}.nii.gz")
            out.to_filename(self._results[key])
        self._results["threshold"] = card.threshold
        return runtime
