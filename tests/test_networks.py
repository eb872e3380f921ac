"""Encoder, heads and augmentation: shapes, dtypes, sizes (DESIGN.md §2, §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.augmentation import random_shift
from learner.td3 import TD3Learner, resolve_device
from td3drive.contracts.config import LearnerConfig
from td3drive.contracts.networks import NatureCNN, build_policy, normalize_image


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_nature_cnn_shapes_and_flatten_size() -> None:
    cnn = NatureCNN()
    assert cnn.flat_dim == 64 * 7 * 7
    out = cnn(torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8))
    assert out.shape == (3, 512) and out.dtype == torch.float32
    assert (out >= 0).all()


def test_layernorm_tanh_output_is_bounded_however_large_the_weights() -> None:
    cnn = NatureCNN(output="layernorm_tanh")
    with torch.no_grad():
        cnn.linear[0].weight.mul_(1e3)  # what unbounded growth would look like
    out = cnn(torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8))
    assert out.shape == (3, 512) and out.dtype == torch.float32
    assert out.abs().max() <= 1.0 and (out < 0).any()
    assert [type(m) for m in cnn.linear] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Tanh]
    with pytest.raises(ValueError, match="encoder output"):
        NatureCNN(output="sigmoid")


def test_pooled_variant_computes_its_flatten_size() -> None:
    cnn = NatureCNN(pooled=True)
    assert cnn.flat_dim == 64 * 4 * 4
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in cnn.modules())
    assert cnn(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 512)


def test_normalisation_happens_once_inside_the_encoder() -> None:
    image = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    np.testing.assert_array_equal(normalize_image(image).numpy(), [[[[0.0, 1.0]]]])
    with pytest.raises(TypeError, match="uint8"):
        normalize_image(image.float())
    with pytest.raises(TypeError, match="uint8"):
        NatureCNN()(torch.zeros(1, 4, 84, 84))


def test_parameter_counts_match_the_design_figures() -> None:
    # DESIGN.md §7: NatureCNN 1.68 M, actor 1.89 M, separate 3.98 M, shared 2.30 M.
    # The LayerNorm trunk (the default) adds 2 x 512 parameters per encoder.
    assert round(count(NatureCNN()) / 1e6, 2) == 1.68
    assert count(NatureCNN(output="layernorm_tanh")) == count(NatureCNN()) + 2 * 512
    assert round(count(build_policy(512, (256, 256))) / 1e6, 2) == 1.89
    separate = TD3Learner(LearnerConfig(encoder="separate", device="cpu"))
    shared = TD3Learner(LearnerConfig(encoder="shared", device="cpu"))
    online = {id(p): p for m in (separate.actor, separate.critic) for p in m.parameters()}
    assert round(sum(p.numel() for p in online.values()) / 1e6, 2) == 3.98
    online = {id(p): p for m in (shared.actor, shared.critic) for p in m.parameters()}
    assert round(sum(p.numel() for p in online.values()) / 1e6, 2) == 2.30


def test_policy_output_is_a_bounded_action() -> None:
    policy = build_policy(64, (32,))
    action = policy(
        torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8), torch.randn(5, 23) * 100
    )
    assert action.shape == (5, 2) and action.dtype == torch.float32
    assert action.abs().max() <= 1.0


def _reference_crops(image: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every crop DrQ's 'pad with edge pixels, crop 84x84' can produce."""
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    h, w = image.shape[1:]
    return [padded[:, y : y + h, x : x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]


def test_random_shift_equals_a_pad_and_crop_per_sample() -> None:
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (16, 4, 84, 84), dtype=np.uint8))
    shifted = random_shift(images, 4, generator)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    offsets = set()
    for original, out in zip(images.numpy(), shifted.numpy(), strict=True):
        crops = _reference_crops(original, 4)
        matches = [i for i, crop in enumerate(crops) if np.array_equal(crop, out)]
        assert len(matches) == 1  # all 4 frames moved together by one offset
        offsets.add(matches[0])
    assert len(offsets) > 1, "every sample got the same shift"


def test_random_shift_pad_zero_is_identity_and_rejects_bad_input() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert random_shift(images, 0, generator) is images
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_shift(images[0], 4, generator)
    with pytest.raises(ValueError, match="pad"):
        random_shift(images, -1, generator)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
