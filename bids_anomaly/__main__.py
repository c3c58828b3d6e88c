"""Allow ``python -m bids_anomaly``."""

from bids_anomaly.cli.run import main

raise SystemExit(main())
