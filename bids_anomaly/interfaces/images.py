"""Interfaces that read, check and reorient images with nibabel."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_anomaly.imaging.images import (
    check_same_grid,
    load_volume,
    padding_to_zero,
    reorient_to_ras,
)

LOGGER = logging.getLogger("nipype.interface")


class _ConformImageInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw 3D image")


class _ConformImageOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image as float32, RAS+, NaNs set to 0")
    note = traits.Str(desc="what was changed in the intensities, for the report (or empty)")


class ConformImage(SimpleInterface):
    """Check a raw image (3D, readable, finite) and reorient it to RAS+ as float32.

    A negative padding value around the head (int16 images filled with -32768) is set to 0
    (:func:`~bids_anomaly.imaging.images.padding_to_zero`). A skull-stripped image with intensities
    below 0 (z-scored, as brain-tumour challenge data are distributed) has its constant
    background taken as outside the head: set to 0, the brain raised above it
    (:func:`~bids_anomaly.imaging.skullstrip.raise_above_background`), and ``note`` says so.
    """

    input_spec = _ConformImageInputSpec
    output_spec = _ConformImageOutputSpec

    def _run_interface(self, runtime):
        from bids_anomaly.imaging.skullstrip import check_background, raise_above_background

        img = load_volume(self.inputs.in_file)
        data = np.asarray(img.dataobj)
        check = check_background(img)
        note = ""
        below_zero = data < 0
        if check.stripped and (below_zero & (data != check.background)).any():
            data, shift = raise_above_background(data, check.background)
            note = (f"{os.path.basename(self.inputs.in_file)}: intensities below 0 around a "
                    f"constant background ({check.background:g}), as in z-scored images: the "
                    f"background is taken as outside the head, the brain raised by {shift:g}")
            LOGGER.warning(note)
        else:
            data, padding = padding_to_zero(data)
            if padding is not None:
                LOGGER.info("%s: padding value %g set to 0", self.inputs.in_file, padding)
        img = reorient_to_ras(nib.Nifti1Image(data, img.affine, img.header))
        out_file = os.path.join(runtime.cwd, "conformed.nii.gz")
        img.to_filename(out_file)
        self._results.update(out_file=out_file, note=note)
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


class _MeanImagesInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="images on one grid")


class MeanImages(SimpleInterface):
    """Voxel-wise mean of images on one grid, over those that are not 0 at each voxel.

    0 marks a voxel outside an image's field of view (as after resampling): where only some
    images cover a voxel, their mean is taken; where none does, the result is 0. One image is
    passed on unchanged.
    """

    input_spec = _MeanImagesInputSpec
    output_spec = _ConformImageOutputSpec

    def _run_interface(self, runtime):
        files = list(self.inputs.in_files)
        if len(files) == 1:
            self._results["out_file"] = files[0]
            return runtime
        first = nib.load(files[0])
        total = np.zeros(first.shape, np.float64)
        count = np.zeros(first.shape, np.int64)
        for path in files:
            data = nib.load(path).get_fdata(dtype=np.float32)
            if data.shape != first.shape:
                raise ValueError(f"{path}: grid {data.shape} differs from {first.shape}")
            total += data
            count += data != 0
        mean = np.where(count > 0, total / np.maximum(count, 1), 0).astype(np.float32)
        out_file = os.path.join(runtime.cwd, "mean.nii.gz")
        nib.Nifti1Image(mean, first.affine, first.header).to_filename(out_file)
        self._results["out_file"] = out_file
        return runtime


class _CombineEchoesInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="the echoes of one multi-echo image, shortest first")
    method = traits.Enum("rss", "mean", "first", usedefault=True,
                         desc="root-sum-of-squares, mean or the first echo")


class CombineEchoes(SimpleInterface):
    """Combine the magnitude echoes of a multi-echo GRE into one 3D image.

    ``rss`` (default) is the root-sum-of-squares, which weights the echoes by their own signal
    (the longer echoes add susceptibility contrast, the shorter signal-to-noise); ``mean`` the
    average; ``first`` keeps the shortest echo. The echoes must share one grid (they come from
    one acquisition); each is read and checked like any input image.
    """

    input_spec = _CombineEchoesInputSpec
    output_spec = _ConformImageOutputSpec

    def _run_interface(self, runtime):
        check_same_grid(list(self.inputs.in_files), "the echoes of one MEGRE")
        images = [load_volume(path) for path in self.inputs.in_files]
        first = images[0]
        data = np.stack([np.asarray(img.dataobj, dtype=np.float64) for img in images])
        if self.inputs.method == "rss":
            combined = np.sqrt((data ** 2).sum(axis=0))
        elif self.inputs.method == "mean":
            combined = data.mean(axis=0)
        else:
            combined = data[0]
        out_file = os.path.join(runtime.cwd, "combined.nii.gz")
        header = first.header.copy()
        header.set_data_dtype(np.float32)
        nib.Nifti1Image(combined.astype(np.float32), first.affine, header).to_filename(out_file)
        self._results["out_file"] = out_file
        return runtime
