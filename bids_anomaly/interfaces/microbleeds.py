"""The microbleed stage: candidates on the susceptibility channel, scored by the model's map."""

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


class _DetectMicrobleedsInputSpec(BaseInterfaceInputSpec):
    channel_file = File(exists=True, mandatory=True,
                        desc="the susceptibility-weighted channel in template space")
    mask_file = File(exists=True, mandatory=True, desc="brain mask in template space")
    anomaly_map = File(exists=True, mandatory=True, desc="the model's anomaly map (scores)")
    regions_brain = File(exists=True, mandatory=True,
                         desc="the template's tissue segmentation (its brain defines the MARS "
                              "regions)")
    ref_to_template = File(exists=True, mandatory=True,
                           desc="the reference's transform to the template (native centres)")
    threshold = traits.Either(None, traits.Float, mandatory=True,
                              desc="candidate score threshold (calibrated; None keeps all)")


class _DetectMicrobleedsOutputSpec(TraitedSpec):
    candidates = File(exists=True, desc="every candidate (TSV), with kept")
    candidate_mask = File(exists=True, desc="the kept candidates' spheres (uint16 labels)")


class DetectMicrobleeds(SimpleInterface):
    """Find microbleed candidates of one subject and keep those above the model's threshold.

    Dark round blobs of 2-10 mm on the channel
    (:func:`~bids_anomaly.postprocessing.microbleeds.blob_candidates`, vessel-like ones
    rejected), each scored by the model's anomaly map
    (:func:`~bids_anomaly.postprocessing.microbleeds.score_candidates`), named by MARS region,
    with its centre also in the raw reference image's world millimetres (``x_native``, ...,
    through the stored registration). ``kept`` marks the candidates above the calibrated
    threshold; the mask holds those, labelled by ``candidate_id``.
    """

    input_spec = _DetectMicrobleedsInputSpec
    output_spec = _DetectMicrobleedsOutputSpec

    def _run_interface(self, runtime):
        from bids_anomaly.imaging.spatial import map_points
        from bids_anomaly.postprocessing.microbleeds import detect_microbleeds

        channel = nib.load(self.inputs.channel_file)
        brain = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        scores = nib.load(self.inputs.anomaly_map).get_fdata(dtype=np.float32)
        regions_brain = np.asarray(nib.load(self.inputs.regions_brain).dataobj) > 0
        table, labels = detect_microbleeds(channel.get_fdata(dtype=np.float32), brain, scores,
                                           channel.affine, regions_brain,
                                           self.inputs.threshold)
        native = map_points(table[["x", "y", "z"]].to_numpy(np.float64),
                            [self.inputs.ref_to_template])
        after = table.columns.get_loc("z") + 1  # the native centre beside the template one
        for axis, column in enumerate(("x_native", "y_native", "z_native")):
            table.insert(after + axis, column, native[:, axis])
        self._results["candidates"] = os.path.join(runtime.cwd, "microbleeds.tsv")
        table.to_csv(self._results["candidates"], sep="\t", index=False, na_rep="n/a",
                     float_format="%.6g")
        self._results["candidate_mask"] = os.path.join(runtime.cwd, "microbleed_mask.nii.gz")
        out = nib.Nifti1Image(labels.astype(np.uint16), channel.affine, channel.header)
        out.set_data_dtype(np.uint16)
        out.to_filename(self._results["candidate_mask"])
        return runtime
