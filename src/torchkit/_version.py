"""The single source of torchkit's version number."""

__version__ = "0.1.0"
