"""Offline toolchain: structures -> simulated DPs -> shaped DPs -> datasets."""
