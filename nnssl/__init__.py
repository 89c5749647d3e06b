"""nnssl: self-supervised pretraining for 3D segmentation CNNs as a plugin for stock nnU-Net v2.

Importing this package must stay cheap: the start-up hook (``nnssl._nnunet_hook``) imports it in every Python
process of the environment, so no torch or nnU-Net import happens here.
"""

__version__ = "0.1.0"
