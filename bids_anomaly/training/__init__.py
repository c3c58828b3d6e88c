"""The train level: fitting, calibrating and saving models."""
