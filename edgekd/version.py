"""edgekd's version, on the ground floor so every module can read it."""

__version__ = "0.1.0"
