"""reloop: keep CTR models accurate while user behaviour drifts."""
__version__ = "0.1.0"
