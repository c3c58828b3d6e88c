"""From anomaly maps to masks, clusters and regional burden."""
