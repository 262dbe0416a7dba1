"""SM-limited persistent Triton kernels (installed as ``lowlevel.kernels``)."""
