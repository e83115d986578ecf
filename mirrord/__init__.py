"""mirrord: mirror router traffic to a collector (kernel clone or TZSP)."""

__version__ = "0.1.0"
