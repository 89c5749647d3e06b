"""The pretraining methods as plain torch: masks, models, corruptions, losses and figures (S3D/MAE, AMAES, VoCo,
Models Genesis, VolumeFusion). Nothing here knows nnU-Net's trainers; ``trainers/`` wires these into them."""
