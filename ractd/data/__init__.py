"""Datasets: D4RL HDF5 and Minari sources, local generation, training windows and normalization."""
