"""Base updates, losses and model generators."""
