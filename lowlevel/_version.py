"""The package version, in one place (read by pyproject.toml without importing lowlevel)."""

__version__ = "0.1.0"
