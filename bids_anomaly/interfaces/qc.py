"""Quality-control interfaces: registration metrics (a one-row TSV) and figures."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

LOGGER = logging.getLogger("nipype.interface")

COREGISTRATION_NMI = 1.03
"""Smallest NMI between a coregistered modality and the reference (inside the covered brain).

Measured on the T2w and FLAIR of sub-mslubL01/L12 (2 sessions each) at 2 mm: aligned within
3 mm, 1.050 to 1.088; rigid registrations 15 to 37 mm off, 1.004 to 1.020.
"""


UNFLAGGED = ("b0",)
"""Images whose NMI with the reference is reported but not flagged. The b = 0 image of the
diffusion runs (EPI, 3 mm on bids_dwi) hardly shares information with a T1w: measured on
bids_dwi in template space, 1.0079 aligned, 1.0075 shifted by 6 mm, 1.0068 by 10 mm, 1.0061 by
16 mm; no threshold separates a good registration from a failed one."""


class _RegistrationQCInputSpec(BaseInterfaceInputSpec):
    subject_name = traits.Str(mandatory=True, desc="sub-<label>[_ses-<label>], for the log")
    reference = traits.Str(mandatory=True, desc="suffix of the reference image")
    native_mask = File(exists=True, mandatory=True, desc="brain mask on the reference grid")
    skull_stripping = traits.Str(mandatory=True, desc="how the brain mask was obtained")
    std_mask = File(exists=True, mandatory=True, desc="brain mask warped to the template")
    template_mask = File(exists=True, mandatory=True, desc="the template's brain mask")
    std_reference = File(exists=True, mandatory=True,
                         desc="bias-corrected reference in template space")
    template_t1w = File(exists=True, mandatory=True, desc="the template image")
    modalities = traits.List(traits.Str, desc="suffixes of the other modalities")
    std_images = InputMultiObject(File(exists=True),
                                  desc="the other modalities in template space, same order")
    covered_masks = InputMultiObject(File(exists=True),
                                     desc="brain inside each other modality's field of view")
    notes = traits.List(traits.Str, desc="what preprocessing changed in the inputs' "
                                         "intensities (empty strings: nothing)")


class _RegistrationQCOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="one row of QC metrics")
    passed = traits.Bool(desc="every metric at or above its threshold")


class RegistrationQC(SimpleInterface):
    """Measure the registration to the template and flag a failure.

    Columns: the reference, how the brain was extracted, the brain volume (ml, native space),
    ``dice`` (warped brain mask vs template mask) and ``nmi`` (warped reference vs template
    image), ``coverage_<modality>`` (share of the brain inside each other modality's field of
    view) and ``nmi_<modality>`` (each coregistered modality vs the reference in template space,
    inside that coverage; flagged below :data:`COREGISTRATION_NMI`, except the diffusion
    b = 0 image ``b0``, see :data:`UNFLAGGED`), ``qc_pass`` and
    ``qc_flags``, and ``notes`` when preprocessing changed an input's intensities (a z-scored
    image raised above its background). Thresholds are in
    :data:`bids_anomaly.evaluation.registration.QC_THRESHOLDS`; the NMI threshold applies to T1w
    references only (it was measured between T1w images). A failure is logged as a warning.
    """

    input_spec = _RegistrationQCInputSpec
    output_spec = _RegistrationQCOutputSpec

    def _run_interface(self, runtime):
        from bids_anomaly.evaluation.registration import (
            QC_THRESHOLDS,
            brain_volume_ml,
            flag_failures,
            normalized_mutual_information,
            registration_qc,
        )

        metrics = registration_qc(self.inputs.std_mask, self.inputs.template_mask,
                                  self.inputs.std_reference, self.inputs.template_t1w)
        row = {
            "reference": self.inputs.reference,
            "skull_stripping": self.inputs.skull_stripping,
            "brain_volume_ml": round(brain_volume_ml(self.inputs.native_mask), 1),
            "dice": round(metrics["dice"], 4),
            "nmi": round(metrics["nmi"], 4),
        }
        mask = np.asarray(nib.load(self.inputs.std_mask).dataobj) > 0
        reference = nib.load(self.inputs.std_reference).get_fdata(dtype=np.float32)
        extra_flags = []
        covered_masks = self.inputs.covered_masks or [None] * len(self.inputs.modalities)
        for modality, path, covered_file in zip(self.inputs.modalities,
                                                self.inputs.std_images or [], covered_masks,
                                                strict=True):
            other = nib.load(path).get_fdata(dtype=np.float32)
            covered = mask
            if covered_file:
                covered = mask & (np.asarray(nib.load(covered_file).dataobj) > 0)
                row[f"coverage_{modality}"] = round(float(covered.sum() / max(1, mask.sum())),
                                                    4)
            row[f"nmi_{modality}"] = round(
                normalized_mutual_information(other, reference, mask=covered), 4)
            if modality not in UNFLAGGED and row[f"nmi_{modality}"] < COREGISTRATION_NMI:
                extra_flags.append(
                    f"NMI {row[f'nmi_{modality}']:.3f} < {COREGISTRATION_NMI} between the "
                    f"{modality} and the {self.inputs.reference}: coregistration failed?")
        # the NMI threshold was measured between T1w images; against the T1w template another
        # contrast scores lower when well registered (the T2w of sub-stroke01: 1.026)
        thresholds = QC_THRESHOLDS if self.inputs.reference == "T1w" else {
            "dice": QC_THRESHOLDS["dice"]}
        flags = flag_failures(metrics, thresholds) + extra_flags
        row["qc_pass"] = not flags
        row["qc_flags"] = "; ".join(flags)
        notes = [note for note in self.inputs.notes or [] if note]
        if notes:
            row["notes"] = "; ".join(notes)
        if flags:
            LOGGER.warning("%s: registration QC failed: %s", self.inputs.subject_name,
                           row["qc_flags"])
        self._results["out_tsv"] = os.path.join(runtime.cwd, "qc.tsv")
        pd.DataFrame([row]).to_csv(self._results["out_tsv"], sep="\t", index=False)
        self._results["passed"] = not flags
        return runtime


class _QCFiguresInputSpec(BaseInterfaceInputSpec):
    reference = traits.Str(mandatory=True, desc="suffix of the reference image")
    native_reference = File(exists=True, mandatory=True, desc="reference image (RAS+)")
    native_mask = File(exists=True, mandatory=True, desc="its brain mask")
    std_reference = File(exists=True, mandatory=True, desc="reference in template space")
    template_t1w = File(exists=True, mandatory=True, desc="the template image")
    modalities = traits.List(traits.Str, desc="suffixes of the other modalities")
    std_images = InputMultiObject(File(exists=True),
                                  desc="the other modalities in template space, same order")


class _QCFiguresOutputSpec(TraitedSpec):
    brain_mask = File(exists=True, desc="mask contour over the reference (SVG)")
    registration = File(exists=True, desc="template edges over the warped reference (SVG)")
    coregistration = OutputMultiObject(File(exists=True),
                                       desc="each modality with the reference's edges (SVG)")


class QCFigures(SimpleInterface):
    """Draw the QC figures of one subject/session (see :mod:`bids_anomaly.reports.qc`)."""

    input_spec = _QCFiguresInputSpec
    output_spec = _QCFiguresOutputSpec

    def _run_interface(self, runtime):
        from bids_anomaly.reports.qc import plot_edges, plot_mask_contour

        ref = self.inputs.reference
        self._results["brain_mask"] = str(plot_mask_contour(
            self.inputs.native_reference, self.inputs.native_mask,
            os.path.join(runtime.cwd, "brain_mask.svg"), title=f"{ref}: brain mask"))
        self._results["registration"] = str(plot_edges(
            self.inputs.std_reference, self.inputs.template_t1w,
            os.path.join(runtime.cwd, "registration.svg"),
            title=f"{ref} in template space, template contours"))
        figures = []
        for modality, path in zip(self.inputs.modalities, self.inputs.std_images or [],
                                  strict=True):
            figures.append(str(plot_edges(
                path, self.inputs.std_reference,
                os.path.join(runtime.cwd, f"coregistration_{modality}.svg"),
                title=f"{modality} in template space, {ref} contours")))
        self._results["coregistration"] = figures
        return runtime
