"""Triton device code of l2p_fast (installed as ``l2p_fast.kernels``); submodules are imported on demand."""
