"""Builders of the shapes world's pretrained models (VAE, text encoder, UNet) and the assembled
Stable Diffusion pipeline, trained deterministically from the world generator: ``python -m testbed.build``."""
