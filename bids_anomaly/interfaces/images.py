"""Interfaces that read, check and reorient images with nibabel."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec

from bids_anomaly.images import load_volume, reorient_to_ras


class _ConformImageInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw 3D image")


class _ConformImageOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image as float32, RAS+, NaNs set to 0")


class ConformImage(SimpleInterface):
    """Check a raw image (3D, readable, finite) and reorient it to RAS+ as float32."""

    input_spec = _ConformImageInputSpec
    output_spec = _ConformImageOutputSpec

    def _run_interface(self, runtime):
        img = reorient_to_ras(load_volume(self.inputs.in_file))
        out_file = os.path.join(runtime.cwd, "conformed.nii.gz")
        img.to_filename(out_file)
        self._results["out_file"] = out_file
        return runtime


class _ApplyMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image")
    mask_file = File(exists=True, mandatory=True, desc="binary mask on the same grid")


class ApplyMask(SimpleInterface):
    """Set voxels outside the mask to 0."""

    input_spec = _ApplyMaskInputSpec
    output_spec = _ConformImageOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        data = np.where(mask, img.get_fdata(dtype=np.float32), 0).astype(np.float32)
        out_file = os.path.join(runtime.cwd, "masked.nii.gz")
        nib.Nifti1Image(data, img.affine, img.header).to_filename(out_file)
        self._results["out_file"] = out_file
        return runtime
