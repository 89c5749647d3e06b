"""Where nnssl meets stock nnU-Net: the start-up hook and class registry, environment variables and smoke-run
controls, seeding, torchrun/DDP, checkpoint helpers. Must stay cheap to import: the hook runs in every process."""
