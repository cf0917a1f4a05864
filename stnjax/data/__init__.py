"""Volumes in, training slices out: files, manifests, preprocessing, the case store, the sampler.

Modules: volume_io (NIfTI and DICOM-folder reading in the canonical
orientation or the official storage order, writing predictions),
orientation (the voxel orders and `Geometry`), dicom (series reading and checks),
manifest (dataset.json, folds, the organ id), preprocess (the one volume
path of training and test: HU window, plane views, 3-slice windows), store
(the decoded cases on disk, read by training and evaluation), sampler
(random training batches of a plane), spec (DataSpec, the typed data
settings).
"""
