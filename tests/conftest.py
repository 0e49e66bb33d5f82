"""Loaded before every test file. The in-process tests run torch on one thread, as the script
runs do (OMP_NUM_THREADS=1): the models are tiny, so a second thread only adds synchronisation,
and on a busy 2-core machine it made some tests several times slower (80 AdamW steps of a tiny
model: 10 s on one thread, 86 s on two with the cores shared)."""

import torch

torch.set_num_threads(1)
