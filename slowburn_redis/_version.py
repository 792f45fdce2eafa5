"""The one source of the package version (read by hatchling at build time)."""

__version__ = "0.2.0.dev0"
