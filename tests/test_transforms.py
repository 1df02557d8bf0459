"""Photometric ops against torchvision, normalisation, the labeled training recipe."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cacnb.data import transforms as T


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=g)
    x[:, :4] = 128  # grey: hue undefined
    x[:, 4:8] = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1)
    x[:, 8:12] = torch.tensor([200, 200, 10], dtype=torch.uint8).view(3, 1, 1)  # two channels tie for the max
    x[:, 12:16] = torch.tensor([90, 10, 90], dtype=torch.uint8).view(3, 1, 1)
    return x


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.03, 0.0, 0.04, 0.1, 0.37])
def test_hue_matches_torchvision(image, factor):
    ours = T.adjust_hue_(image.float(), factor)
    ref = F.adjust_hue(image.float() / 255, factor) * 255
    assert (ours - ref).abs().max() < 1e-2


@pytest.mark.parametrize("op,ref_op", [(T.adjust_brightness_, F.adjust_brightness),
                                       (T.adjust_contrast_, F.adjust_contrast),
                                       (T.adjust_saturation_, F.adjust_saturation)])
@pytest.mark.parametrize("factor", [0.6, 1.0, 1.4])
def test_blends_match_torchvision(image, op, ref_op, factor):
    ours = op(image.float(), factor)
    ref = ref_op(image.float() / 255, factor) * 255
    assert (ours - ref).abs().max() < 1e-2


def test_grayscale_matches_torchvision(image):
    ours = T.grayscale_(image.float())
    ref = F.rgb_to_grayscale(image.float() / 255, num_output_channels=3) * 255
    assert (ours - ref).abs().max() < 1e-2


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_blur_matches_torchvision(image, sigma):
    ksize = 2 * max(1, math.ceil(3 * sigma)) + 1
    ours = T.gaussian_blur_(image.float(), sigma)
    ref = F.gaussian_blur(image.float(), [ksize, ksize], [sigma, sigma])
    assert (ours - ref).abs().max() < 1e-2


def test_photometric_does_not_modify_input_and_stays_in_range(image):
    before = image.clone()
    for seed in range(30):
        with T.seeded(seed):
            out = T.photometric(image)
        assert out.dtype == torch.float32 and out.shape == image.shape
        assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3
    assert torch.equal(image, before)


def test_normalize_denormalize_roundtrip(image):
    x = T.normalize(image)
    assert torch.allclose(T.denormalize(x) * 255, image.float(), atol=1e-3)
    assert torch.allclose(T.denormalize(x[None])[0], T.denormalize(x))
    out = torch.empty(3, 48, 40)
    assert torch.allclose(T.normalize_into(image, out), x)


def test_seeded_is_deterministic_and_restores_state():
    torch.manual_seed(1)
    with T.seeded(7):
        a = torch.rand(3)
    after = torch.rand(1)
    torch.manual_seed(1)
    with T.seeded(7):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after)


COLOURS = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [220, 220, 40]], dtype=torch.uint8)


def _blocks(h, w, seed):
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 4, (h // 10 + 1, w // 10 + 1))
    label = torch.from_numpy(np.kron(cells, np.ones((10, 10), dtype=np.int64))[:h, :w].astype(np.uint8))
    return COLOURS[label.long()].permute(2, 0, 1).contiguous(), label


def _bilinear(image, size):
    return F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


@pytest.mark.parametrize("h,w", [(30, 45), (45, 30), (90, 60), (100, 150)])
def test_train_augment_keeps_labels_aligned(h, w, monkeypatch):
    # bilinear instead of the (official) bicubic image resize, whose ringing near edges would blur this check
    monkeypatch.setattr(T, "resize_image", _bilinear)
    image, label = _blocks(h, w, h * w)
    checked = 0
    for seed in range(25):
        with T.seeded(seed):
            img, lab = T.train_augment(image, label, crop_size=48, base_size=60, scale_range=(0.5, 2.0))
        assert img.shape == (3, 48, 48) and lab.shape == (48, 48)
        lab = lab.long()
        pad = lab == 255
        assert ((img[:, pad].long() - torch.tensor(T.MEAN_UINT8).view(3, 1)).abs() <= 1).all()
        # interior of uniform 5x5 label neighbourhoods: colour = the label's colour
        f = lab.float()[None, None]
        hi = torch.nn.functional.max_pool2d(f, 5, stride=1)[0, 0]
        lo = -torch.nn.functional.max_pool2d(-f, 5, stride=1)[0, 0]
        interior = torch.zeros_like(pad)
        interior[2:-2, 2:-2] = hi == lo
        interior &= ~pad
        expected = COLOURS[lab[interior]].T.long()
        assert ((img[:, interior].long() - expected).abs() <= 2).all()
        checked += int(interior.sum())
    assert checked > 25 * 200


def test_train_augment_flips_and_jitter():
    image, label = _blocks(40, 40, 0)
    flipped = 0
    for seed in range(20):
        with T.seeded(seed):
            img, lab = T.train_augment(image, label, crop_size=40, base_size=40, scale_range=(1.0, 1.0))
        flipped += torch.equal(lab, label.flip(-1)) and not torch.equal(lab, label)
        assert torch.equal(lab, label) or torch.equal(lab, label.flip(-1))
    assert 3 < flipped < 17
    with T.seeded(0):
        img, _ = T.train_augment(image, label, crop_size=40, base_size=40, jitter=True)
    assert img.dtype == torch.float32 and img.shape == (3, 40, 40)


# ---------------------------------------------------------------------------------------------------------------
# the official pipeline: bicubic image resize, then blur p=0.5 (5x5), jitter p=0.8, grayscale p=0.2


def test_images_resize_bicubic_labels_nearest(image):
    label = torch.randint(0, 21, image.shape[-2:], dtype=torch.uint8)
    size = (image.shape[-2] * 3, image.shape[-1] * 3)
    out_image, out_label = T.resize_pair(*T.as_tv(image, label), size)
    bicubic = F.resize(image, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
    bilinear = F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(out_image, bicubic) and not torch.equal(out_image, bilinear)
    assert set(out_label.unique().tolist()) <= set(label.unique().tolist())  # nearest: no mixed class ids


def test_blur_is_the_official_5x5_kernel():
    impulse = torch.zeros(3, 11, 11)
    impulse[:, 5, 5] = 256.0
    out = T.blur_5x5_(impulse.clone())
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    expected = torch.zeros(11, 11)
    expected[3:8, 3:8] = torch.outer(taps, taps)  # cv2.GaussianBlur(img, (5, 5), 0): [1 4 6 4 1] / 16
    assert torch.allclose(out[0], expected) and torch.allclose(out[2], expected)


def test_photometric_order_is_blur_jitter_gray(monkeypatch):
    calls = []
    for name in ("blur_5x5_", "color_jitter_", "grayscale_"):
        original = getattr(T, name)
        monkeypatch.setattr(T, name, lambda x, _f=original, _n=name: (calls.append(_n), _f(x))[1])
    monkeypatch.setattr(T, "coin", lambda p: True)
    T.photometric(torch.full((3, 8, 8), 100, dtype=torch.uint8))
    assert calls == ["blur_5x5_", "color_jitter_", "grayscale_"]


def test_blur_before_jitter_is_observable():
    # jitter clamps at 255, so it does not commute with the blur: on a 200-level impulse, blur-then-brighten(1.5)
    # brightens the blurred peak, brighten-then-blur blurs the clipped one, and the centres differ by a known amount
    x = torch.zeros(3, 9, 9)
    x[:, 4, 4] = 200.0
    blur_first = T.adjust_brightness_(T.blur_5x5_(x.clone()), 1.5)
    jitter_first = T.blur_5x5_(T.adjust_brightness_(x.clone(), 1.5))
    assert blur_first[0, 4, 4] == pytest.approx(200 * 36 / 256 * 1.5)  # 42.2: blurred, then brightened
    assert jitter_first[0, 4, 4] == pytest.approx(255 * 36 / 256)       # 35.9: clipped at 255, then blurred
    # the pipeline: with jitter fixed to brightness 1.5, its output is the blur-first value
    image = torch.zeros(3, 9, 9, dtype=torch.uint8)
    image[:, 4, 4] = 200
    brighten = lambda x: T.adjust_brightness_(x, 1.5)  # noqa: E731
    with T.seeded(3), pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "color_jitter_", brighten)
        out = T.photometric(image, p_blur=1.0, p_jitter=1.0, p_gray=0.0)
    assert out[0, 4, 4] == pytest.approx(200 * 36 / 256 * 1.5)
