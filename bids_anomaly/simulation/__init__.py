"""Simulation: generated data with a known truth, for the demo, the tests and the benchmarks.

- :mod:`~bids_anomaly.simulation.synthetic`: the demo's BIDS dataset (deformed template
  tissue, contrasts, lesions, veins and microbleeds) and the diffusion cohort;
- :mod:`~bids_anomaly.simulation.cohorts`: cohorts with known age, sex and site effects, as the
  models' training data.

It sits above :mod:`bids_anomaly.models` (cohorts are training data); the physics of a
microbleed that the demo's images and the self-supervised models' synthetic anomalies share is
below both, in :mod:`bids_anomaly.imaging.susceptibility`.
"""
