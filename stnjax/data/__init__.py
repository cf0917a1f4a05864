"""Volumes in, training slices out: files, manifests, preprocessing, the case store, the sampler.

Modules: volume_io (NIfTI and DICOM-folder reading in the canonical
orientation, writing predictions), dicom (series reading and checks),
manifest (dataset.json, folds, the organ id), preprocess (HU window, plane
views, 3-slice windows), store (the decoded training cases on disk),
sampler (random training batches of a plane).
"""
