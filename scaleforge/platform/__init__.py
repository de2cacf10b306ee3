"""The recipe-agnostic runtime: configs, engines, train loop, checkpoints, metrics, data.

Never imports ``scaleforge.models``: recipes are handed in by the launcher.
"""
