"""lbd: a load-sharing daemon with no single point of failure."""

__version__ = "0.1.0"
