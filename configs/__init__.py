"""Experiment configs, one file per paper recipe: `python -m dferjax.main --config configs/<name>.py[:args]`.

A package so that derived configs import the config they build on (`from configs import stt_dfew`).
"""
