"""Metrics, group tables and statistics."""
