"""Triton kernel library shared by training and inference. Imports neither ``platform`` nor ``models``."""
