"""Simulation: generated data with a known truth, for the demo, the tests and the benchmarks.

- :mod:`~bids_anomaly.simulation.synthetic`: the demo's BIDS dataset (deformed template
  tissue, contrasts, lesions, veins and microbleeds) and the diffusion cohort;
- :mod:`~bids_anomaly.simulation.cohorts`: cohorts with known age, sex and site effects;
- :mod:`~bids_anomaly.simulation.susceptibility`: the dipole field of a microbleed, shared with
  the anomalies that self-supervised models insert (it sits below :mod:`bids_anomaly.models`).

Nothing is imported here, so that models can use the susceptibility model alone.
"""
