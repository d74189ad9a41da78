"""Networks: the segmentation U-Net (2D, 2.5D, 3D) and the conditional diffusion U-Net."""

from .unet import ResidualUNet
