"""Command-line interface: the BIDS Apps contract."""
