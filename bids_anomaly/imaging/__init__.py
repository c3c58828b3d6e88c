"""Imaging: reading volumes, templates, and the image operations of preprocessing.

- :mod:`~bids_anomaly.imaging.images`: NIfTI volumes read safely, masks carried onto a grid;
- :mod:`~bids_anomaly.imaging.template`: the embedded template (nilearn's MNI152) and tissue maps;
- :mod:`~bids_anomaly.imaging.spatial`: resampling through stored ANTs transforms;
- :mod:`~bids_anomaly.imaging.normalization`: intensity normalisation inside the brain;
- :mod:`~bids_anomaly.imaging.skullstrip`: images already skull-stripped, and their masks;
- :mod:`~bids_anomaly.imaging.susceptibility`: how a gradient echo darkens around a magnetised
  sphere (a microbleed), for the demo's images and the models' synthetic anomalies;
- :mod:`~bids_anomaly.imaging.diffusion`: dwi runs and gradients read and checked, tensor fit;
- :mod:`~bids_anomaly.imaging.hdf5`: reproducible HDF5 files (ITK transforms without times).

Pure array code and file reading only: nothing here knows BIDS names or Nipype.
"""
