"""Whole jobs built from the floors below: the section IV experiments, one
reconstruction from files, the bench presets and the paper's loop as their
baseline, and the figures they draw. Each tool's one library call lives here.
"""
