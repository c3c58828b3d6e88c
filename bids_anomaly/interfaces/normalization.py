"""Interface for intensity normalisation inside the brain mask."""

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

from bids_anomaly.imaging.normalization import METHODS, normalize


class _NormalizeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image in template space")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    method = traits.Enum(*METHODS, usedefault=True, desc="normalisation method")
    modality = traits.Str("T1w", usedefault=True,
                          desc="BIDS suffix of the image (WhiteStripe's white-matter peak)")


class _NormalizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="normalised image, 0 outside the mask")


class NormalizeIntensity(SimpleInterface):
    """Normalise intensities inside the brain (see :mod:`bids_anomaly.imaging.normalization`)."""

    input_spec = _NormalizeInputSpec
    output_spec = _NormalizeOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        data = normalize(img.get_fdata(dtype=np.float32), mask, self.inputs.method,
                         modality=self.inputs.modality)
        out = nib.Nifti1Image(data, img.affine, img.header)
        out.set_data_dtype(np.float32)
        self._results["out_file"] = os.path.join(runtime.cwd, "normalized.nii.gz")
        out.to_filename(self._results["out_file"])
        return runtime
