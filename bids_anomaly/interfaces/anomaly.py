"""The model stage as Nipype interfaces: channels -> anomaly map and thresholded mask."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_anomaly.config import RESTRICTIONS


class _AnomalyOutputSpec(TraitedSpec):
    anomaly_map = File(exists=True, desc="voxel-wise anomaly score (float32)")
    channel_maps = OutputMultiObject(File(exists=True),
                                     desc="per-channel maps the score combines (deep models)")
    anomaly_mask = File(exists=True, desc="voxels judged abnormal (uint8)")
    threshold = traits.Float(desc="the score threshold used")
    clusters = File(exists=True, desc="table of the mask's connected clusters (TSV)")
    regions = File(exists=True, desc="anomaly burden per tissue class and atlas region (TSV)")
    z_maps = OutputMultiObject(File(exists=True),
                               desc="per-channel z-scores against the participant's norms")
    centile_maps = OutputMultiObject(File(exists=True),
                                     desc="per-channel centiles of the participant's norms")
    norms = File(exists=True, desc="regional values against the participant's norms (TSV)")
    probsegs = OutputMultiObject(File(exists=True),
                                 desc="class posterior maps of a model that segments tissues, "
                                      "in the order of its labels")


class _PostprocessingInputSpec(BaseInterfaceInputSpec):
    tissue_file = File(exists=True, desc="template tissue segmentation (cluster tissue class)")
    min_cluster_mm3 = traits.Float(0.0, usedefault=True,
                                   desc="drop clusters smaller than this from mask and table")
    restrict = traits.Enum(*RESTRICTIONS, usedefault=True,
                           desc="flag voxels in the whole brain or in white matter only")
    atlas_file = File(exists=True, desc="user atlas on the template grid")
    atlas_labels = traits.Dict(traits.Str, traits.Str, desc="atlas region names by label")


def _write_image(path: str, data: np.ndarray, dtype: type, reference: nib.Nifti1Image) -> str:
    """Write ``data`` as ``dtype`` on the grid of ``reference``; return ``path``."""
    out = nib.Nifti1Image(data.astype(dtype), reference.affine, reference.header)
    out.set_data_dtype(dtype)
    out.to_filename(path)
    return path


def _write_maps(results: dict, cwd: str, anomaly_map: np.ndarray, anomaly_mask: np.ndarray,
                inputs) -> None:
    """Restrict the mask, drop small clusters, write map, mask, clusters and regional tables.

    ``inputs`` carries the brain mask (``mask_file``, also the output grid) and the
    post-processing options (:class:`_PostprocessingInputSpec`).
    """
    from bids_anomaly.postprocessing.clusters import cluster_table
    from bids_anomaly.postprocessing.regions import regional_table
    from bids_anomaly.postprocessing.tuning import apply_postprocessing

    reference = nib.load(inputs.mask_file)
    brain = np.asarray(reference.dataobj) > 0
    voxel_volume = float(np.prod(reference.header.get_zooms()[:3]))
    tissue = atlas = None
    if inputs.tissue_file:
        tissue = np.asarray(nib.load(inputs.tissue_file).dataobj).astype(np.int64)
    atlas_labels = {int(label): name for label, name in (inputs.atlas_labels or {}).items()}
    if inputs.atlas_file:
        atlas = np.asarray(nib.load(inputs.atlas_file).dataobj).astype(np.int64)
    min_voxels = int(np.ceil(inputs.min_cluster_mm3 / voxel_volume))
    anomaly_mask = apply_postprocessing(anomaly_mask, brain, tissue, 0.0, min_voxels,
                                        inputs.restrict)
    for key, data, dtype in (("anomaly_map", anomaly_map, np.float32),
                             ("anomaly_mask", anomaly_mask, np.uint8)):
        results[key] = _write_image(os.path.join(cwd, f"{key}.nii.gz"), data, dtype, reference)
    tables = {
        "clusters": cluster_table(anomaly_map, anomaly_mask, reference.affine, tissue, atlas,
                                  atlas_labels),
        "regions": regional_table(anomaly_map, anomaly_mask, brain, voxel_volume, tissue, atlas,
                                  atlas_labels),
    }
    for key, table in tables.items():
        results[key] = os.path.join(cwd, f"{key}.tsv")
        table.to_csv(results[key], sep="\t", index=False, na_rep="n/a", float_format="%.6g")


def _write_channel_maps(cwd: str, reference_file: str, maps: np.ndarray,
                        channels: list[str]) -> list[str]:
    """Write one float32 map per channel on the grid of ``reference_file``."""
    reference = nib.load(reference_file)
    return [_write_image(os.path.join(cwd, f"channel_map_{channel}.nii.gz"), data, np.float32,
                         reference)
            for data, channel in zip(maps, channels, strict=True)]


def _write_posteriors(results: dict, cwd: str, reference_file: str,
                      posteriors: dict) -> None:
    """Write one float32 posterior map per class (a tissue-segmenting model)."""
    reference = nib.load(reference_file)
    results["probsegs"] = [
        _write_image(os.path.join(cwd, f"probseg_{label}.nii.gz"),
                     values.cpu().numpy(), np.float32, reference)
        for label, values in posteriors.items()]


def _write_norms(results: dict, cwd: str, reference_file: str, z: np.ndarray,
                 table, channels: list[str]) -> None:
    """Write the per-channel z-score and centile maps and the regional norms table."""
    from scipy.special import ndtr

    reference = nib.load(reference_file)
    inside = np.asarray(reference.dataobj) > 0
    results["z_maps"], results["centile_maps"] = [], []
    for data, channel in zip(z, channels, strict=True):
        results["z_maps"].append(_write_image(os.path.join(cwd, f"z_{channel}.nii.gz"), data,
                                              np.float32, reference))
        centile = np.where(inside & (data != 0), 100 * ndtr(data), 0)
        results["centile_maps"].append(_write_image(
            os.path.join(cwd, f"centile_{channel}.nii.gz"), centile, np.float32, reference))
    results["norms"] = os.path.join(cwd, "norms.tsv")
    table.to_csv(results["norms"], sep="\t", index=False, na_rep="n/a", float_format="%.6g")


def _check_scores(anomaly_map: np.ndarray, mask: np.ndarray, model: str) -> None:
    """Refuse a map with NaN or infinite scores in the brain: the model is broken.

    Raises
    ------
    BadDataError
        Naming the model and how many brain voxels it scored so.
    """
    from bids_anomaly.errors import BadDataError

    bad = int((~np.isfinite(anomaly_map[mask > 0])).sum())
    if bad:
        raise BadDataError(f"model {model!r} scores {bad} brain voxels NaN or infinite: its "
                           "weights are damaged or do not suit these images; train it again")


def _threshold_maps(anomaly_map: np.ndarray, mask: np.ndarray, threshold: float,
                    fdr: float, tail: dict | None) -> tuple[np.ndarray, float]:
    """The mask at ``threshold``, or by Benjamini-Hochberg at ``fdr`` when it is set."""
    from bids_anomaly.postprocessing.thresholds import apply_threshold, fdr_mask

    if fdr:
        return fdr_mask(anomaly_map, mask, tail, fdr)
    return apply_threshold(anomaly_map, mask, threshold), threshold


class _ScoreAnomalyInputSpec(_PostprocessingInputSpec):
    channel_files = InputMultiObject(File(exists=True), mandatory=True,
                                     desc="template-space images in the model's channel order")
    mask_file = File(exists=True, mandatory=True, desc="brain mask in template space")
    model_dir = Directory(exists=True, mandatory=True, nohash=True, desc="model directory")
    model_checksum = traits.Str(mandatory=True, desc="checksum of the weights (cache key)")
    card_checksum = traits.Str(mandatory=True,
                               desc="checksum of model.json: threshold, calibration and "
                                    "channels (cache key; a retrained model can keep its "
                                    "weights)")
    fdr = traits.Float(0.0, usedefault=True,
                       desc="false-discovery rate for Benjamini-Hochberg (0: use the "
                            "calibrated false-positive-rate threshold)")
    device = traits.Str("cpu", usedefault=True, nohash=True, desc="torch device")
    covariates = traits.Dict(traits.Str, traits.Str,
                             desc="the participant's covariates, for a model with norms "
                                  "that depend on them")
    extrapolate = traits.Bool(False, usedefault=True,
                              desc="accept covariates outside the model's training range")


class ScoreAnomaly(SimpleInterface):
    """Score one subject with a trained model and threshold at its calibrated level.

    NaN or infinite scores in the brain are refused (the model is broken), naming the model.
    """

    input_spec = _ScoreAnomalyInputSpec
    output_spec = _AnomalyOutputSpec

    def _run_interface(self, runtime):
        import torch

        from bids_anomaly.errors import BadDataError
        from bids_anomaly.models import ChannelScorer, SubjectImages, TissueSegmenter, load_model
        from bids_anomaly.models.contract import needs_covariates
        from bids_anomaly.models.data import scaling_for

        model, card = load_model(self.inputs.model_dir)
        tail = card.extra.get("calibration_tail")
        if self.inputs.fdr and tail is None:
            raise BadDataError(f"model {card.name!r} stores no healthy score distribution "
                               "(trained by an older version): retrain it to use --fdr")
        subject = SubjectImages("subject", list(self.inputs.channel_files), self.inputs.mask_file,
                                scaling=scaling_for(card.channels,
                                                    card.extra.get("channel_scaling")))
        image, mask = subject.load(self.inputs.device)
        if needs_covariates(model):
            covariates = dict(self.inputs.covariates) or None
            extrapolate = bool(self.inputs.extrapolate)
            z, table, model = model.normative_outputs(image, mask, covariates, extrapolate)
            _write_norms(self._results, runtime.cwd, self.inputs.mask_file, z.cpu().numpy(),
                         table, card.channels)
        with torch.no_grad():
            if isinstance(model, ChannelScorer):
                per_channel = model.channel_scores(image, mask)
                anomaly_map = model.combine(per_channel).cpu().numpy().astype(np.float32)
                self._results["channel_maps"] = _write_channel_maps(
                    runtime.cwd, self.inputs.mask_file, per_channel.cpu().numpy(),
                    card.channels)
            elif isinstance(model, TissueSegmenter):
                scores, posteriors = model.score_with_posteriors(image, mask)
                anomaly_map = scores.cpu().numpy().astype(np.float32)
                _write_posteriors(self._results, runtime.cwd, self.inputs.mask_file, posteriors)
            else:
                anomaly_map = model.score(image, mask).cpu().numpy().astype(np.float32)
        _check_scores(anomaly_map, mask.cpu().numpy(), card.name)
        anomaly_mask, threshold = _threshold_maps(anomaly_map, mask.cpu().numpy(),
                                                  card.threshold, self.inputs.fdr, tail)
        _write_maps(self._results, runtime.cwd, anomaly_map, anomaly_mask, self.inputs)
        self._results["threshold"] = threshold
        return runtime


class _FitSubjectModelInputSpec(_PostprocessingInputSpec):
    channel_files = InputMultiObject(File(exists=True), mandatory=True,
                                     desc="the subject's template-space images")
    mask_file = File(exists=True, mandatory=True, desc="brain mask in template space")
    model_type = traits.Str(mandatory=True,
                            desc="a registered family that can be fitted on one subject")
    hyperparameters = traits.Dict(desc="the model's hyperparameters")
    regions_file = File(exists=True, desc="template tissue segmentation (for per_tissue)")
    tissue_files = InputMultiObject(File(exists=True),
                                    desc="template GM, WM and CSF probability maps")
    channel_names = traits.List(traits.Str, desc="the channels' names, in order")
    fpr = traits.Float(mandatory=True, desc="voxel false-positive rate of the threshold")
    fdr = traits.Float(0.0, usedefault=True, desc="Benjamini-Hochberg rate (0: use fpr)")
    device = traits.Str("cpu", usedefault=True, nohash=True, desc="torch device")


class FitSubjectModel(SimpleInterface):
    """Single-subject mode: fit a model on the subject's own brain and score it.

    Without healthy controls, the threshold (and the p-values for ``fdr``) come from the fitted
    model itself: scores of a million samples drawn from it give the healthy distribution the
    model believes in. For the mixtures, heavy tails (``tmm``, ``mmst``) and trimming keep the
    lesions from being absorbed by the fit. The family implements ``simulated_scores()`` and
    either ``fit_subject(image, mask, regions)`` (the mixtures) or, fitting nothing beyond the
    template's maps, ``fit(data)`` on the one subject (``tissue``, which fits its mixture on
    every image it scores); its ``single_subject`` flag says so. Models that segment tissues
    (:class:`~bids_anomaly.models.contract.TissueSegmenter`) also write their class posteriors.
    """

    input_spec = _FitSubjectModelInputSpec
    output_spec = _AnomalyOutputSpec

    def _run_interface(self, runtime):
        import torch

        from bids_anomaly.models import REGISTRY, SubjectImages, TissueSegmenter, TrainingData
        from bids_anomaly.postprocessing.thresholds import tail_table, threshold_at_fpr

        torch.manual_seed(self.inputs.hyperparameters.get("random_seed", 0))
        subject = SubjectImages("subject", list(self.inputs.channel_files), self.inputs.mask_file)
        image, mask = subject.load(self.inputs.device)
        model = REGISTRY[self.inputs.model_type].from_hyperparameters(
            dict(self.inputs.hyperparameters))
        if hasattr(model, "fit_subject"):
            regions = None
            if getattr(model, "per_tissue", False):
                regions = torch.from_numpy(
                    np.asarray(nib.load(self.inputs.regions_file).dataobj).astype(np.int64))
            model.fit_subject(image, mask, regions)
        else:
            channels = list(self.inputs.channel_names) or [
                f"channel{i}" for i in range(len(self.inputs.channel_files))]
            model.fit(TrainingData([subject], channels, self.inputs.device,
                                   self.inputs.regions_file or None,
                                   list(self.inputs.tissue_files) or None))
        with torch.no_grad():
            if isinstance(model, TissueSegmenter):
                scores, posteriors = model.score_with_posteriors(image, mask)
                anomaly_map = scores.cpu().numpy().astype(np.float32)
                _write_posteriors(self._results, runtime.cwd, self.inputs.mask_file, posteriors)
            else:
                anomaly_map = model.score(image, mask).cpu().numpy().astype(np.float32)
            simulated = model.simulated_scores()
        _check_scores(anomaly_map, mask.cpu().numpy(), f"{self.inputs.model_type}-single")
        threshold = threshold_at_fpr(simulated, self.inputs.fpr)
        anomaly_mask, threshold = _threshold_maps(anomaly_map, mask.cpu().numpy(), threshold,
                                                  self.inputs.fdr, tail_table(simulated))
        _write_maps(self._results, runtime.cwd, anomaly_map, anomaly_mask, self.inputs)
        self._results["threshold"] = threshold
        return runtime
