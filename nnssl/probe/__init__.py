"""The frozen-encoder segmentation probe: is a pretraining checkpoint's encoder better than a random one?

A light decoder is trained on the frozen stem and encoder (exactly the tensors fine-tuning loads) for a fixed, small,
seeded budget on a labeled nnU-Net dataset, and scored on its held-out cases; the same probe on a randomly
initialised encoder of the same architecture is the floor. ``nnssl_probe`` runs it on a checkpoint
(``nnssl.probe.cli``); the pretraining trainers run it every N epochs when ``nnssl_probe_dataset`` is set
(``nnssl.probe.periodic``). documentation/probe.md describes both.
"""
