"""Sharded HDF5 data: writing shard sets, indexing users' files, planning and reading per-rank shares.

Everything here is framework-free (NumPy + h5py); hvdtrain.torch.data and hvdtrain.tf.data adapt it.
"""
