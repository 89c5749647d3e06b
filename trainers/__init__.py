"""nnU-Net trainer classes of nnssl (installed as ``nnssl.trainers``); nnU-Net finds them by class name."""
