"""xtalsym: crystal-symmetry classification from diffraction patterns."""

__version__ = "0.1.0"
