"""Test set-up: Triton runs through its interpreter when no GPU is present.

TRITON_INTERPRET must be set before any module defining Triton kernels is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
