"""Checking that a parallel layout trains the same model as another (``tools/verify_layout.py``).

    gradients.py  every parameter's gradient gathered to its global (TP=1, unsharded) shape
    probe.py      a torchrun worker: the training flags for K iterations, metrics, iteration-1 grads
    compare.py    layouts from ``tp=2,cp=2``, launching the probes, per-iteration comparison
"""
