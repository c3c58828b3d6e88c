"""Nipype workflows: participant preprocessing, the model stage, and derivative writing."""
