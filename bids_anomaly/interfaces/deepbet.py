"""Brain extraction: deepbet (weights ship inside the deepbet package), unless already done."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_anomaly.imaging.skullstrip import MODES, check_background, mask_from_background

LOGGER = logging.getLogger("nipype.interface")


class _BrainExtractionInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="head image (RAS+)")
    skull_stripped = traits.Enum(*MODES, usedefault=True,
                                 desc="auto: detect a constant background; yes: the image is "
                                      "already stripped; no: always run deepbet")
    modality = traits.Str("T1w", usedefault=True, desc="BIDS suffix of the image (for the log)")
    threshold = traits.Float(0.5, usedefault=True, desc="probability threshold of the mask")
    n_dilate = traits.Int(0, usedefault=True, desc="voxels to dilate (negative: erode)")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True, desc="run the network on CUDA")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads for torch")


class _BrainExtractionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image with non-brain voxels set to 0")
    out_mask = File(exists=True, desc="binary brain mask (uint8)")
    method = traits.Str(desc="deepbet, detected (constant background) or declared")
    volume_ml = traits.Float(desc="brain volume in ml")


class BrainExtraction(SimpleInterface):
    """Brain mask of the reference image.

    Images that are already skull-stripped (declared, or detected by
    :func:`~bids_anomaly.imaging.skullstrip.check_background`) keep their own brain: the mask is
    what is not background. Other images go through deepbet (Fisch et al. 2024). deepbet was trained
    on T1-weighted images; on other contrasts it runs too (measured on the T2w of sub-stroke01:
    1,581 ml, contour on the brain) and says so in the log, and the registration QC checks the
    result.
    """

    input_spec = _BrainExtractionInputSpec
    output_spec = _BrainExtractionOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        check = check_background(img)
        mode = self.inputs.skull_stripped
        if mode == "yes" or (mode == "auto" and check.stripped):
            method = "declared" if mode == "yes" else "detected"
            LOGGER.info("%s: skull-stripped (%s; background %g on %.0f %% of the voxels, "
                        "%.0f ml of brain): brain extraction skipped", self.inputs.in_file,
                        method, check.background, 100 * check.background_fraction,
                        check.foreground_ml)
            mask = mask_from_background(img, check.background)
            brain = np.where(mask, img.get_fdata(dtype=np.float32), 0).astype(np.float32)
        else:
            method = "deepbet"
            if self.inputs.modality != "T1w":
                LOGGER.warning("the reference is %s: deepbet was trained on T1w images; check "
                               "its brain mask in the QC report", self.inputs.modality)
            mask, brain = self._deepbet(img)
        mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine, img.header)
        mask_img.set_data_dtype(np.uint8)
        brain_img = nib.Nifti1Image(brain, img.affine, img.header)
        brain_img.set_data_dtype(np.float32)
        self._results["out_file"] = os.path.join(runtime.cwd, "brain.nii.gz")
        self._results["out_mask"] = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        brain_img.to_filename(self._results["out_file"])
        mask_img.to_filename(self._results["out_mask"])
        self._results["method"] = method
        self._results["volume_ml"] = float(mask.sum() * np.prod(img.header.get_zooms()[:3])
                                           / 1000.0)
        return runtime

    def _deepbet(self, img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from deepbet import BrainExtraction as DeepBet

        torch.set_num_threads(max(1, self.inputs.num_threads))
        bet = DeepBet(no_gpu=not self.inputs.use_gpu)
        brain, mask, _ = bet.run(img, threshold=self.inputs.threshold,
                                 n_dilate=self.inputs.n_dilate)
        return (np.asarray(mask.dataobj) > 0,
                np.asarray(brain.dataobj, dtype=np.float32))
