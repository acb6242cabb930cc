"""The package version: one place, read by the CLI and recorded in every report and fingerprint."""

__version__ = "0.1.0"
