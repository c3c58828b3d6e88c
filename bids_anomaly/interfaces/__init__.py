"""Nipype interfaces around nibabel, deepbet, antspyx and the model stage."""
