"""Interfaces around antspyx: N4, registration and resampling.

ITK's thread count is read from ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, which the command line
sets from ``--omp-nthreads`` before any node runs.
"""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to correct")
    mask_file = File(exists=True, desc="estimate the bias field inside this mask")
    shrink_factor = traits.Int(4, usedefault=True, desc="downsampling of the fit")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image")


class N4BiasFieldCorrection(SimpleInterface):
    """N4 bias-field correction (antspyx)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        import ants

        image = ants.image_read(self.inputs.in_file)
        kwargs = {"shrink_factor": self.inputs.shrink_factor}
        if self.inputs.mask_file:
            kwargs["mask"] = ants.image_read(self.inputs.mask_file)
        # N4 fits a log field: negative intensities (ringing, z-scored data) are clipped to 0
        image = image.new_image_like(np.clip(image.numpy(), 0, None))
        corrected = ants.n4_bias_field_correction(image, **kwargs)
        self._results["out_file"] = os.path.join(runtime.cwd, "n4.nii.gz")
        ants.image_write(corrected, self._results["out_file"])
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
        ants.config._random_seed = self.inputs.random_seed
        fixed = ants.image_read(self.inputs.fixed_image)
        moving = ants.image_read(self.inputs.moving_image)
        mask = ants.image_read(self.inputs.fixed_mask) if self.inputs.fixed_mask else None
        composite = self.inputs.composite
        prefix = os.path.join(runtime.cwd, "reg_")
        result = ants.registration(
            fixed, moving, type_of_transform=self.inputs.transform_type, mask=mask,
            outprefix=prefix, write_composite_transform=composite,
        )
        if composite:
            forward, inverse = prefix + "Composite.h5", prefix + "InverseComposite.h5"
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


class _ApplyTransformsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="resampled image")


class ApplyTransforms(SimpleInterface):
    """Resample an image through a chain of transforms with ``ants.apply_transforms``."""

    input_spec = _ApplyTransformsInputSpec
    output_spec = _ApplyTransformsOutputSpec

    def _run_interface(self, runtime):
        from bids_anomaly.spatial import apply_transforms

        self._results["out_file"] = os.path.join(runtime.cwd, "resampled.nii.gz")
        apply_transforms(
            self.inputs.in_file, self.inputs.reference_file, list(self.inputs.transforms),
            self._results["out_file"], invert=list(self.inputs.invert) or None,
            interpolation=self.inputs.interpolation, binarize=self.inputs.binarize,
        )
        return runtime
