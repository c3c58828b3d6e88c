"""The longitudinal workflow: lesion change between a subject's sessions, and its derivatives."""

from __future__ import annotations

from nipype.pipeline import engine as pe

from bids_anomaly import bids
from bids_anomaly.config import Settings
from bids_anomaly.imaging.template import Template
from bids_anomaly.interfaces.longitudinal import LesionChange
from bids_anomaly.longitudinal.change import CLASSES
from bids_anomaly.longitudinal.subject import TISSUES
from bids_anomaly.workflows.outputs import _connect_item, _sink

CLUSTER_COLUMNS = {
    "cluster": {"Description": "cluster number (largest first), as on the lightbox"},
    "change": {"Description": "new: brighter later, away from the earlier session's lesions; "
                              "enlarging: brighter later, touching one; shrinking: darker "
                              "later", "Levels": {v: v for v in CLASSES.values()}},
    "voxels": {"Description": "voxels of the 1 mm midpoint grid"},
    "volume_ml": {"Description": "volume", "Units": "ml"},
    "peak_score": {"Description": "largest |change score| in the cluster (-log10 p)"},
    **{axis: {"Description": f"{axis} of the cluster's centre in the later session's raw "
                             "image's world coordinates (RAS)", "Units": "mm"}
       for axis in "xyz"},
}
SUMMARY_COLUMNS = {
    "earlier": {"Description": "the earlier session of the pair"},
    "later": {"Description": "the later session of the pair"},
    **{f"{name}_{kind}": {"Description": f"{name} lesions: {what}", **units}
       for name in CLASSES.values()
       for kind, what, units in (("count", "number", {}), ("ml", "volume", {"Units": "ml"}))},
    "threshold": {"Description": "the label-free threshold of |change score|: its 1 - FPR "
                                 "quantile over the voxels normal-appearing in both sessions"},
}


def subject_sessions(subjects: list[bids.AnatInputs]
                     ) -> tuple[dict[str, list[bids.AnatInputs]], list[str]]:
    """The subjects whose change can be measured, and a note for each of the others.

    Returns
    -------
    sessions : dict
        Subject label to its sessions that have the lesion contrast, in label order (two or
        more).
    notes : list of str
        One line per subject left out (one session, or no lesion contrast in two).
    """
    from bids_anomaly.longitudinal.subject import lesion_contrast

    by_subject: dict[str, list[bids.AnatInputs]] = {}
    for inputs in subjects:
        by_subject.setdefault(inputs.subject, []).append(inputs)
    chosen, notes = {}, []
    for subject, sessions in sorted(by_subject.items()):
        sessions = sorted(sessions, key=lambda i: i.session or "")
        contrast = lesion_contrast([m for i in sessions for m in i.modalities])
        usable = [i for i in sessions if contrast is not None and contrast in i.images]
        if len(sessions) < 2:
            notes.append(f"sub-{subject} has one session: no change to measure, scored "
                         "cross-sectionally")
        elif len(usable) < 2:
            notes.append(f"sub-{subject}: fewer than two sessions with a FLAIR, T2w or PDw "
                         "image: no change to measure, scored cross-sectionally")
        else:
            if len(usable) < len(sessions):
                notes.append(f"sub-{subject}: sessions without {contrast} left out of the "
                             f"change: {', '.join(i.session for i in sessions if i not in usable)}")
            chosen[subject] = usable
    return chosen, notes


def init_longitudinal_wf(settings: Settings, subject: str, sessions: list[bids.AnatInputs],
                         template: Template) -> pe.Workflow:
    """Measure the change between consecutive sessions of a subject and write it.

    Per later session: the signed change map, the changed voxels and the change classes on its
    raw lesion-contrast grid (``space-<contrast>``) and in template space, the table of changed
    lesions and the before / after / change lightbox; per subject, the counts and volumes of
    every session pair (``sub-<label>_desc-lesions_change.tsv``).

    Parameters
    ----------
    settings : Settings
        The run's settings (``--fpr``, ``--min-cluster-size``, seed, threads).
    subject : str
        The subject label.
    sessions : list of AnatInputs
        Its preprocessed sessions, in time order, each with the lesion contrast.
    template : Template
        Template files.
    """
    from bids_anomaly.longitudinal.subject import lesion_contrast

    output_dir, space, res = settings.output_dir, template.name, template.resolution
    contrast = lesion_contrast([m for i in sessions for m in i.modalities])

    def derivative(inputs: bids.AnatInputs, spec: dict) -> str:
        return str(bids.spec_path(output_dir, inputs.subject, inputs.session, spec))

    workflow = pe.Workflow(name=f"sub_{subject}_longitudinal_wf")
    change = pe.Node(LesionChange(
        labels=[i.session for i in sessions],
        images=[str(i.images[contrast]) for i in sessions],
        template_masks=[derivative(i, bids.brain_mask_spec(space, res)) for i in sessions],
        reference_to_template=[derivative(i, bids.transform_spec(i.reference, space))
                               for i in sessions],
        template_to_reference=[derivative(i, bids.transform_spec(space, i.reference))
                               for i in sessions],
        to_reference=["" if contrast == i.reference else
                      derivative(i, bids.transform_spec(contrast, i.reference, ".mat"))
                      for i in sessions],
        template_tissues=[str(template.probseg[t]) for t in TISSUES],
        template_grid=str(template.brain_mask),
        random_seed=settings.execution.random_seed, fpr=settings.model.fpr,
        min_cluster_mm3=settings.postprocessing.min_cluster_mm3,
        num_threads=settings.execution.threads),
        name="lesion_change", mem_gb=4.0, n_procs=settings.execution.threads)
    about = {"Method": "participant --longitudinal: tissue-model lesion posteriors of both "
                       "sessions (shared tissue parameters) and a test of the harmonised "
                       "intensity difference, on the subject's midpoint space",
             "Contrast": contrast, "FalsePositiveRateTarget": settings.model.fpr}
    for index in range(1, len(sessions)):
        earlier, later = sessions[index - 1], sessions[index]
        pair = {**about, "EarlierSession": earlier.session,
                "Sources": [str(earlier.images[contrast]), str(later.images[contrast])]}
        native = {"Description": f"on the raw {contrast} image's grid of this session"}
        sinks = (
            ("native_maps", bids.change_map_spec(contrast, None, earlier.session),
             {**pair, **native, "ScoreDefinition": _SCORE}),
            ("native_masks", bids.change_mask_spec(contrast, None, earlier.session),
             {**pair, **native}),
            ("native_dsegs", bids.change_dseg_spec(contrast, None, earlier.session),
             {**pair, **native, "Labels": _LABELS}),
            ("template_maps", bids.change_map_spec(space, res, earlier.session),
             {**pair, "ScoreDefinition": _SCORE}),
            ("template_masks", bids.change_mask_spec(space, res, earlier.session), pair),
            ("template_dsegs", bids.change_dseg_spec(space, res, earlier.session),
             {**pair, "Labels": _LABELS}),
            ("clusters", bids.change_clusters_spec(earlier.session),
             {**CLUSTER_COLUMNS, **pair}),
            ("figures", bids.change_figure_spec(earlier.session), None),
        )
        for field, spec, metadata in sinks:
            sink = _sink(f"ds_{field}_{later.session}", output_dir, subject, later.session,
                         spec, metadata)
            _connect_item(workflow, change, field, index - 1, sink)
    summary = _sink("ds_change_summary", output_dir, subject, None,
                    bids.change_summary_spec(), {**SUMMARY_COLUMNS, **about})
    workflow.connect(change, "summary", summary, "in_file")
    return workflow


_SCORE = ("signed change: the mean of |later - earlier tissue score| and -log10 p of the "
          "harmonised intensity difference against the noise of normal-appearing tissue, "
          "positive where the later session is brighter (new, enlarging), negative where it "
          "is darker (shrinking)")
_LABELS = {str(value): name for value, name in CLASSES.items()}
