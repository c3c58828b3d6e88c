"""What the deep model families share: MONAI networks, datasets, the training loop and DDP.

It sits below the families that use it (:mod:`bids_anomaly.models.reconstruction`, and the
self-supervised ones) and never imports them.
"""
