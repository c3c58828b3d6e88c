"""Writing derivatives: the Nipype side of :mod:`bids_anomaly.bids`."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from bids_anomaly.bids import derivative_path, write_sidecar


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to save")
    output_dir = traits.Str(mandatory=True, desc="root of the derivative dataset")
    subject = traits.Str(mandatory=True)
    session = traits.Either(None, traits.Str, usedefault=True)
    suffix = traits.Str(mandatory=True)
    extension = traits.Str(".nii.gz", usedefault=True)
    datatype = traits.Str("anat", usedefault=True, desc="folder: anat or figures")
    entities = traits.Dict(traits.Str, traits.Any, desc="other entities (space, desc, ...)")
    metadata = traits.Dict(traits.Str, traits.Any, desc="JSON sidecar content")
    source_files = InputMultiObject(traits.Str, desc="BIDS URIs of the sources")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the saved derivative")


class DerivativesDataSink(SimpleInterface):
    """Copy a result to its BIDS-derivative name and write its JSON sidecar.

    Always runs, so that a derivative deleted by hand is written again on the next run, while
    the computation behind it stays cached; a derivative that is already there with the same
    content is left untouched.
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        out_file = derivative_path(
            Path(self.inputs.output_dir), self.inputs.subject, self.inputs.session,
            self.inputs.suffix, self.inputs.extension, self.inputs.datatype,
            **(self.inputs.entities or {}),
        )
        out_file.parent.mkdir(parents=True, exist_ok=True)
        if not (out_file.is_file() and filecmp.cmp(self.inputs.in_file, out_file, shallow=False)):
            shutil.copyfile(self.inputs.in_file, out_file)  # unchanged files keep their times
        metadata = dict(self.inputs.metadata or {})
        metadata.update(spatial_metadata(self.inputs.entities or {}, self.inputs.extension,
                                         metadata))
        if self.inputs.source_files:
            metadata["Sources"] = list(self.inputs.source_files)
        if metadata:
            write_sidecar(out_file, metadata)
        self._results["out_file"] = str(out_file)
        return runtime


def spatial_metadata(entities: dict, extension: str, metadata: dict) -> dict:
    """Sidecar keys that BIDS requires of an image with ``space-`` (and ``res-``).

    ``Resolution`` describes the ``res-`` label (template space); an image in the space of a
    raw image (``space-T1w``, ``space-FLAIR``, no ``res-``) names it as ``SpatialReference``.
    Keys already given are kept.

    >>> spatial_metadata({"space": "MNI152NLin2009aSym", "res": 2}, ".nii.gz", {})
    {'Resolution': '2 mm isotropic, template MNI152NLin2009aSym'}
    >>> spatial_metadata({"space": "FLAIR"}, ".nii.gz", {})["SpatialReference"]
    "the grid of the subject/session's raw FLAIR image"
    """
    added: dict = {}
    space, res = entities.get("space"), entities.get("res")
    if not extension.startswith(".nii") or space is None:
        return added
    if res is not None and "Resolution" not in metadata:
        added["Resolution"] = f"{res} mm isotropic, template {space}"
    elif res is None and "SpatialReference" not in metadata:
        added["SpatialReference"] = f"the grid of the subject/session's raw {space} image"
    return added
