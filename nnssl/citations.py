"""References stored in checkpoints (``citations``) and printed in training logs."""

NNUNET = ("Isensee F, Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH. nnU-Net: a self-configuring method for deep "
          "learning-based biomedical image segmentation. Nature Methods 18, 203-211 (2021).")
RESENC = ("Isensee F, Wald T, Ulrich C, et al. nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical Image "
          "Segmentation. MICCAI 2024.")
S3D = ("Wald T, Ulrich C, Suprijadi J, et al. Revisiting MAE pre-training for 3D medical image segmentation. "
       "CVPR 2025.")
SPARK = ("Tian K, Jiang Y, Diao Q, et al. Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked "
         "Modeling. ICLR 2023.")
OPENMIND = ("Wald T, Ulrich C, et al. An OpenMind for 3D medical vision self-supervised learning. arXiv:2412.17041 "
            "(2024).")
MAE = "He K, Chen X, Xie S, et al. Masked Autoencoders Are Scalable Vision Learners. CVPR 2022."

PRETRAINING_BASE = (NNUNET, RESENC, OPENMIND)
