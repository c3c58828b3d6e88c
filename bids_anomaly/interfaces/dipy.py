"""Interfaces to dipy: diffusion-tensor maps of a session's dwi runs."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_anomaly.imaging.diffusion import (
    B0_THRESHOLD,
    DwiData,
    brain_mask_from_b0,
    check_maps,
    fit_tensor,
    load_dwi_runs,
    mean_b0,
)

LOGGER = logging.getLogger("nipype.interface")

SHELL_ROUNDING = 50
"""b-values (s/mm^2) are rounded to this step when shells are counted."""


class _DTIFitInputSpec(BaseInterfaceInputSpec):
    dwi_files = InputMultiObject(File(exists=True), mandatory=True,
                                 desc="4D dwi runs of one session")
    # Not File(exists=True): a missing sidecar must reach load_dwi_runs and its clear message.
    bval_files = InputMultiObject(File(exists=False), mandatory=True,
                                  desc=".bval file of each run, in the same order")
    bvec_files = InputMultiObject(File(exists=False), mandatory=True,
                                  desc=".bvec file of each run, in the same order")
    params = traits.List(traits.Str(), value=["FA", "MD"], usedefault=True,
                         desc="tensor maps to write (FA, MD, AD, RD)")
    fit_method = traits.Str("WLS", usedefault=True, desc="dipy tensor fit method")


class _DTIFitOutputSpec(TraitedSpec):
    b0_file = File(exists=True, desc="mean b=0 image, float32, on the dwi grid")
    mask_file = File(exists=True, desc="brain mask from the b=0 image, uint8")
    b0_brain_file = File(exists=True, desc="mean b=0 image inside the brain mask")
    maps = OutputMultiObject(File(exists=True), desc="one map per param, in the same order")
    summary = traits.Dict(desc="volumes, b0_volumes, runs, shells, directions")


class DTIFit(SimpleInterface):
    """Fit a diffusion tensor to a session's dwi runs and write its maps.

    The runs are read onto the first run's grid
    (:func:`~bids_anomaly.imaging.diffusion.load_dwi_runs`), a brain mask is computed from their
    mean b=0 image, and the tensor is fitted inside it
    (:func:`~bids_anomaly.imaging.diffusion.fit_tensor`). Every output has the first run's affine;
    maps are named after their parameter (``FA.nii.gz``, ...).
    """

    input_spec = _DTIFitInputSpec
    output_spec = _DTIFitOutputSpec

    def _run_interface(self, runtime):
        dwi = load_dwi_runs(self.inputs.dwi_files, self.inputs.bval_files,
                            self.inputs.bvec_files)
        summary = gradient_summary(dwi)
        LOGGER.info("%s: %s", self.inputs.dwi_files[0], summary)
        b0 = mean_b0(dwi)
        mask = brain_mask_from_b0(b0, dwi.header.get_zooms()[:3])
        maps = fit_tensor(dwi, mask, params=self.inputs.params,
                          fit_method=self.inputs.fit_method)
        self._results["b0_file"] = _save(b0, dwi, runtime.cwd, "b0", np.float32)
        self._results["mask_file"] = _save(mask, dwi, runtime.cwd, "mask", np.uint8)
        self._results["b0_brain_file"] = _save(np.where(mask, b0, 0), dwi, runtime.cwd,
                                               "b0_brain", np.float32)
        self._results["maps"] = [_save(maps[name], dwi, runtime.cwd, name, np.float32)
                                 for name in self.inputs.params]
        self._results["summary"] = summary
        return runtime


def gradient_summary(dwi: DwiData) -> dict[str, object]:
    """Counts that describe an acquisition, for logs and reports.

    Parameters
    ----------
    dwi : DwiData
        The loaded runs.

    Returns
    -------
    dict
        ``volumes``, ``b0_volumes``, ``runs``, ``shells`` (distinct b-values above
        :data:`~bids_anomaly.imaging.diffusion.B0_THRESHOLD`, rounded to 50 s/mm^2) and
        ``directions`` (number of diffusion-weighted volumes).
    """
    weighted = dwi.bvals > B0_THRESHOLD
    shells = np.round(dwi.bvals[weighted] / SHELL_ROUNDING) * SHELL_ROUNDING
    return {
        "volumes": int(dwi.bvals.size),
        "b0_volumes": int((~weighted).sum()),
        "runs": int(dwi.runs),
        "shells": sorted({int(b) for b in shells}),
        "directions": int(weighted.sum()),
    }


def _save(data: np.ndarray, dwi: DwiData, folder: str, name: str, dtype: type) -> str:
    """Write a 3D array on the dwi grid, with the first run's header and affine."""
    header = dwi.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), dwi.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    out_file = os.path.join(folder, f"{name}.nii.gz")
    img.to_filename(out_file)
    return out_file


class _PrecomputedMapsInputSpec(BaseInterfaceInputSpec):
    map_files = InputMultiObject(File(exists=True), mandatory=True,
                                 desc="maps of another pipeline, one per param, same order")
    reference_file = traits.Str("", usedefault=True,
                                desc="that pipeline's b=0 reference (dwiref), or empty")
    params = traits.List(traits.Str(), mandatory=True, desc="the maps' names (FA, MD, ...)")


class PrecomputedMaps(SimpleInterface):
    """Check another pipeline's diffusion maps and choose the image they are registered by.

    The maps are checked by :func:`~bids_anomaly.imaging.diffusion.check_maps`. The registration
    image (``b0_file``, and ``b0_brain_file`` inside the maps' support) is the pipeline's
    ``dwiref`` when given, else MD (bright CSF, like a b = 0 image), else the first map.
    """

    input_spec = _PrecomputedMapsInputSpec
    output_spec = _DTIFitOutputSpec

    def _run_interface(self, runtime):
        from bids_anomaly.imaging.images import load_volume

        params = list(self.inputs.params)
        data, first = check_maps(dict(zip(params, self.inputs.map_files, strict=True)))
        support = np.any([d != 0 for d in data.values()], axis=0)
        if self.inputs.reference_file:
            reference = load_volume(self.inputs.reference_file)
            b0_file = self.inputs.reference_file
            b0 = np.asarray(reference.dataobj, dtype=np.float32)
            affine, header = reference.affine, reference.header
            brain = b0 * (b0 > 0)
        else:
            chosen = "MD" if "MD" in data else params[0]
            b0_file = self.inputs.map_files[params.index(chosen)]
            b0, affine, header = data[chosen], first.affine, first.header
            brain = np.where(support, b0, 0)
        mask_file = os.path.join(runtime.cwd, "mask.nii.gz")
        nib.Nifti1Image(support.astype(np.uint8), first.affine, first.header).to_filename(
            mask_file)
        brain_file = os.path.join(runtime.cwd, "b0_brain.nii.gz")
        nib.Nifti1Image(brain.astype(np.float32), affine, header).to_filename(brain_file)
        maps = []  # as read (NaNs set to 0, float32), in params order
        for name in params:
            maps.append(os.path.join(runtime.cwd, f"{name}.nii.gz"))
            nib.Nifti1Image(data[name], first.affine, first.header).to_filename(maps[-1])
        self._results.update(b0_file=str(b0_file), mask_file=mask_file,
                             b0_brain_file=brain_file, maps=maps,
                             summary={"source": "precomputed", "maps": params})
        return runtime
