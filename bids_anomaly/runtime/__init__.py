"""Runtime: how a run executes, reports its progress and chooses its device.

- :mod:`~bids_anomaly.runtime.execution`: Nipype runs (supervised workers, clean interruption,
  failures mapped back, logs);
- :mod:`~bids_anomaly.runtime.progress`: progress of long runs, with an ETA;
- :mod:`~bids_anomaly.runtime.device`: ``--device`` resolved (``auto``, ``cpu``, ``cuda``).
"""
