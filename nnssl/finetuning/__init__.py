"""Fine-tuning from a pretrained checkpoint: recipes, their per-iteration schedules, augmentation, the adaptation
plan stored in checkpoints and the transfer of weights into an nnU-Net network."""
