"""rotator: keeps OUTSCALE EIM access keys short-lived, publishing each verified key to Vault."""

from importlib import metadata

try:
    __version__ = metadata.version("rotator")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
