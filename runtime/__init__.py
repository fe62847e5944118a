"""Torch-free runtime: restore images from an engine directory; see README "Runtime"."""
