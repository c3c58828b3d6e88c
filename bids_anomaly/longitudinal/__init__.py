"""Change between the sessions of one subject: a common space, and the change itself.

:mod:`~bids_anomaly.longitudinal.midpoint` places every session in one space that favours none
of them; :mod:`~bids_anomaly.longitudinal.change` scores, thresholds and classes the change of a
session pair on that space's grid.
"""
