"""Brain extraction with deepbet (weights ship inside the deepbet package)."""

from __future__ import annotations

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


class _BrainExtractionInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="head image (RAS+)")
    threshold = traits.Float(0.5, usedefault=True, desc="probability threshold of the mask")
    n_dilate = traits.Int(0, usedefault=True, desc="voxels to dilate (negative: erode)")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True, desc="run the network on CUDA")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads for torch")


class _BrainExtractionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image with non-brain voxels set to 0")
    out_mask = File(exists=True, desc="binary brain mask (uint8)")


class BrainExtraction(SimpleInterface):
    """Brain extraction with deepbet's networks (Fisch et al. 2024)."""

    input_spec = _BrainExtractionInputSpec
    output_spec = _BrainExtractionOutputSpec

    def _run_interface(self, runtime):
        import torch
        from deepbet import BrainExtraction as DeepBet

        torch.set_num_threads(max(1, self.inputs.num_threads))
        img = nib.load(self.inputs.in_file)
        bet = DeepBet(no_gpu=not self.inputs.use_gpu)
        brain, mask, _ = bet.run(img, threshold=self.inputs.threshold,
                                 n_dilate=self.inputs.n_dilate)
        mask_data = np.asarray(mask.dataobj).astype(np.uint8)
        mask_img = nib.Nifti1Image(mask_data, img.affine, img.header)
        mask_img.set_data_dtype(np.uint8)
        brain_img = nib.Nifti1Image(np.asarray(brain.dataobj, dtype=np.float32), img.affine,
                                    img.header)
        self._results["out_file"] = os.path.join(runtime.cwd, "brain.nii.gz")
        self._results["out_mask"] = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        brain_img.to_filename(self._results["out_file"])
        mask_img.to_filename(self._results["out_mask"])
        return runtime
