"""DrQ random-shift image augmentation (Kostrikov et al. 2020, "Image
Augmentation Is All You Need", §3.1: pad 4 with edge replication, random
84×84 crop).

Departure from DrQ-v2 (Yarats et al. 2021), which shifts by sub-pixel amounts
with bilinear ``grid_sample`` on float images: we shift by whole pixels, as
DrQ does, so the images stay uint8 until the encoder's first line. The pad is
never materialised: clamping the gather indices to the image is the same as
replicate-padding and cropping.
"""

from __future__ import annotations

import torch


def random_shift(image: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of a batch by its own random offset in ``[-pad, pad]``
    pixels along each axis, replicating edge pixels into the gap.

    Args:
        image: ``uint8[B, C, H, W]`` (any dtype works; all channels of one
            sample share the shift, so a frame stack stays aligned).
        pad: maximum shift in pixels, ``≥ 0``; 0 returns ``image`` unchanged.
        generator: source of the offsets, on ``image``'s device.

    Returns:
        A new tensor of the same shape and dtype.

    Raises:
        ValueError: ``image`` is not 4-D or ``pad < 0``.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be [B, C, H, W], got shape {list(image.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return image
    batch, channels, height, width = image.shape
    device = image.device
    shifts = torch.randint(
        -pad, pad + 1, (2, batch), device=device, generator=generator
    )  # row and column offset per sample
    rows = (torch.arange(height, device=device)[None, :] + shifts[0, :, None]).clamp_(0, height - 1)
    cols = (torch.arange(width, device=device)[None, :] + shifts[1, :, None]).clamp_(0, width - 1)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return image[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
