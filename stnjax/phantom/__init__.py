"""The built-in synthetic CT dataset: phantom volumes with a pancreas label.

Modules: geometry (grids, shapes, noise), anatomy (the organs painted into
a volume), volumes (one phantom case from a config and a seed), dataset (a
folder of phantom cases with its dataset.json).
"""
