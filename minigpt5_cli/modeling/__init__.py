"""The model: backbones, vokens, feature mapper, losses, the one builder, checkpoints and bundles."""
