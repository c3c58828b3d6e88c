"""Interfaces around antspyx: N4, registration and resampling.

ITK's thread count is read from ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, which the command line
sets from ``--omp-nthreads`` before any node runs.
"""

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

from bids_anomaly.imaging.hdf5 import strip_object_times
from bids_anomaly.imaging.spatial import ants_seed

LOGGER = logging.getLogger("nipype.interface")


SLOPPY_LINEAR_ITERATIONS = (100, 50, 0, 0)
"""``--sloppy`` linear registration: iterations at shrink factors 6, 4, 2, 1 (antspyx's
default: 2100, 1200, 1200, 10). On a generated subject of the demo, rigid coregistration took
0.9 s instead of 6.0 s; before SyN, the affine stage took 0.7 s and the whole registration 3.8 s
instead of 6.2 s, the warped image's correlation with the template 0.913 (default 0.912)."""

SLOPPY_N4_ITERATIONS = (20, 20, 20, 20)
"""``--sloppy`` N4 iterations per level (antspyx's default: 50 at each of 4 levels)."""


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to correct")
    mask_file = File(exists=True, desc="estimate the bias field inside this mask")
    shrink_factor = traits.Int(2, usedefault=True, desc="downsampling of the fit")
    max_nonpositive = traits.Float(
        0.05, usedefault=True,
        desc="largest share of non-positive voxels in the mask for which N4 still runs")
    sloppy = traits.Bool(False, usedefault=True,
                         desc="fewer iterations (SLOPPY_N4_ITERATIONS): for tests and the demo")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image")
    corrected = traits.Bool(desc="whether N4 ran (False: the image was passed on unchanged)")


class N4BiasFieldCorrection(SimpleInterface):
    """N4 bias-field correction (antspyx) inside a mask.

    N4 fits a multiplicative field to log intensities, so it needs positive data. A few
    non-positive voxels (ringing, interpolation undershoot) are clipped to 0; an image with more
    than ``max_nonpositive`` of its mask at or below 0 has been rescaled already (z-scores) and is
    passed on unchanged, with a warning, as bias correction has no meaning there.
    """

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        import ants

        image = ants.image_read(self.inputs.in_file)
        data = image.numpy()
        mask = None
        inside = np.ones(data.shape, dtype=bool)
        if self.inputs.mask_file:
            mask = ants.image_read(self.inputs.mask_file)
            inside = mask.numpy() > 0
        self._results["out_file"] = os.path.join(runtime.cwd, "n4.nii.gz")
        nonpositive = float(np.mean(data[inside] <= 0)) if inside.any() else 1.0
        if nonpositive > self.inputs.max_nonpositive:
            LOGGER.warning("%s: %.0f %% of the brain is at or below 0 (already normalised "
                           "data?): bias-field correction skipped", self.inputs.in_file,
                           100 * nonpositive)
            ants.image_write(image, self._results["out_file"])
            self._results["corrected"] = False
            return runtime
        image = image.new_image_like(np.clip(data, 0, None))
        options = ({"convergence": {"iters": list(SLOPPY_N4_ITERATIONS), "tol": 1e-7}}
                   if self.inputs.sloppy else {})
        corrected = ants.n4_bias_field_correction(
            image, mask=mask, shrink_factor=self.inputs.shrink_factor, **options)
        ants.image_write(corrected, self._results["out_file"])
        self._results["corrected"] = True
        return runtime


class _RegistrationInputSpec(BaseInterfaceInputSpec):
    fixed_image = File(exists=True, mandatory=True, desc="target image")
    moving_image = File(exists=True, mandatory=True, desc="image to align")
    fixed_mask = File(exists=True, desc="restrict the metric to this mask in the fixed image")
    transform_type = traits.Str("SyN", usedefault=True,
                                desc="antspyx type_of_transform (Rigid, Affine, SyN, ...)")
    random_seed = traits.Int(0, usedefault=True, desc="seed of the metric's sampling")
    composite = traits.Bool(True, usedefault=True,
                            desc="write ITK composite .h5 files (else the affine .mat)")
    syn_iterations = traits.Tuple(
        (20, 10, 0), traits.Int, traits.Int, traits.Int, usedefault=True,
        desc="SyN iterations at shrink factors 4, 2 and 1 (antspyx's default is 40, 20, 0: on "
             "6 bids_real references at 2 mm, 20, 10, 0 took 2.8 s instead of 3.3 s for a mean "
             "Dice with the template mask of 0.9794 instead of 0.9797)")
    sloppy = traits.Bool(
        False, usedefault=True,
        desc="linear stages with SLOPPY_LINEAR_ITERATIONS (SyN: an affine registration so "
             "run, then SyN alone from it): for tests and the demo")


class _RegistrationOutputSpec(TraitedSpec):
    forward_transform = File(exists=True, desc="moving-to-fixed transform (ITK .h5 or .mat)")
    inverse_transform = File(exists=True, desc="fixed-to-moving transform")
    warped_image = File(exists=True, desc="moving image resampled into the fixed grid")


class Registration(SimpleInterface):
    """Register ``moving_image`` to ``fixed_image`` with ``ants.registration``.

    With ``composite`` (the default) both directions are returned as ITK composite ``.h5``
    files, whatever the transform type; otherwise the type must be linear and both outputs are
    the same affine ``.mat`` file, to be applied inverted for the inverse direction.
    """

    input_spec = _RegistrationInputSpec
    output_spec = _RegistrationOutputSpec

    def _run_interface(self, runtime):
        import ants

        # antspyx passes this seed to antsRegistration's --random-seed (no public setter that
        # leaves the thread count alone)
        ants.config._random_seed = ants_seed(self.inputs.random_seed)
        fixed = ants.image_read(self.inputs.fixed_image)
        moving = ants.image_read(self.inputs.moving_image)
        mask = ants.image_read(self.inputs.fixed_mask) if self.inputs.fixed_mask else None
        composite = self.inputs.composite
        prefix = os.path.join(runtime.cwd, "reg_")
        transform, options = self.inputs.transform_type, {}
        if self.inputs.sloppy and transform == "SyN":
            # antspyx's SyN runs its affine stage with 2100, 1200, 1200 iterations whatever
            # it is given: the affine is run first, with few, and SyN starts from it
            linear = ants.registration(
                fixed, moving, type_of_transform="Affine", mask=mask,
                outprefix=os.path.join(runtime.cwd, "affine_"),
                aff_iterations=SLOPPY_LINEAR_ITERATIONS)
            transform, options = "SyNOnly", {"initial_transform": linear["fwdtransforms"][0]}
        elif self.inputs.sloppy:
            options = {"aff_iterations": SLOPPY_LINEAR_ITERATIONS}
        result = ants.registration(
            fixed, moving, type_of_transform=transform, mask=mask,
            outprefix=prefix, write_composite_transform=composite,
            reg_iterations=tuple(self.inputs.syn_iterations), **options,
        )
        if composite:
            forward, inverse = prefix + "Composite.h5", prefix + "InverseComposite.h5"
            for path in (forward, inverse):  # the same transform gives the same bytes
                strip_object_times(path)
        else:
            forward = inverse = result["fwdtransforms"][0]
        warped = os.path.join(runtime.cwd, "warped.nii.gz")
        ants.image_write(result["warpedmovout"], warped)
        self._results.update(forward_transform=forward, inverse_transform=inverse,
                             warped_image=warped)
        return runtime


class _ApplyTransformsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to resample")
    reference_file = File(exists=True, mandatory=True, desc="grid of the output")
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="transforms, applied last to first (ITK order)")
    invert = traits.List(traits.Bool, value=[], usedefault=True,
                         desc="invert each linear transform (same length), none by default")
    interpolation = traits.Enum("linear", "genericLabel", "nearestNeighbor", "bSpline",
                                "lanczosWindowedSinc", usedefault=True)
    binarize = traits.Bool(False, usedefault=True, desc="threshold the result at 0.5 (uint8)")
    field_of_view = traits.Bool(False, usedefault=True,
                                desc="resample the image's field of view (a mask of ones) "
                                     "instead of its intensities; output binarised")


class _ApplyTransformsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="resampled image")


class ApplyTransforms(SimpleInterface):
    """Resample an image through a chain of transforms with ``ants.apply_transforms``."""

    input_spec = _ApplyTransformsInputSpec
    output_spec = _ApplyTransformsOutputSpec

    def _run_interface(self, runtime):
        from bids_anomaly.imaging.spatial import apply_transforms

        self._results["out_file"] = os.path.join(runtime.cwd, "resampled.nii.gz")
        in_file = self.inputs.in_file
        if self.inputs.field_of_view:
            import nibabel as nib

            img = nib.load(in_file)
            in_file = os.path.join(runtime.cwd, "field_of_view.nii.gz")
            nib.Nifti1Image(np.ones(img.shape[:3], np.uint8), img.affine).to_filename(in_file)
        apply_transforms(
            in_file, self.inputs.reference_file, list(self.inputs.transforms),
            self._results["out_file"], invert=list(self.inputs.invert) or None,
            interpolation=self.inputs.interpolation,
            binarize=self.inputs.binarize or self.inputs.field_of_view,
        )
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to resample")
    voxel_size = traits.Float(2.0, usedefault=True, desc="isotropic voxel size (mm)")
    interpolation = traits.Enum("linear", "nearestNeighbor", usedefault=True)


class _ResampleOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="resampled image (same field of view)")


class ResampleToVoxelSize(SimpleInterface):
    """Resample an image to isotropic voxels over the same field of view (antspyx).

    Registrations estimate transforms in world coordinates, so estimating them on a coarser copy
    of the image (at the output resolution) gives transforms that apply to the original. An
    image already at that voxel size is passed on as it is.
    """

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        import ants

        size = self.inputs.voxel_size
        spacing = nib.load(self.inputs.in_file).header.get_zooms()[:3]
        if np.allclose(spacing, size, rtol=0, atol=1e-4):  # already there: nothing to do
            self._results["out_file"] = self.inputs.in_file
            return runtime
        image = ants.image_read(self.inputs.in_file)
        interp = 0 if self.inputs.interpolation == "linear" else 1
        resampled = ants.resample_image(image, (size, size, size), use_voxels=False,
                                        interp_type=interp)
        self._results["out_file"] = os.path.join(runtime.cwd, "resampled.nii.gz")
        ants.image_write(resampled, self._results["out_file"])
        return runtime
