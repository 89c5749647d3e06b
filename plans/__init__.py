"""nnU-Net planners and fingerprint extraction for nnssl (installed as ``nnssl.plans``)."""
