"""Joint image + mask augmentation (torchvision.transforms.v2 functional ops) and photometric augmentation.

Images travel as ``tv_tensors.Image`` uint8 ``[3, H, W]`` and labels as ``tv_tensors.Mask`` uint8 ``[H, W]``
through the geometry (rescale, pad, crop, flip: shared by the labeled recipe here and the crop pairs in
``pairs.py``). Photometric ops then work on one float [0, 255] buffer per crop, and :func:`normalize` /
:func:`to_model_input` produce the ImageNet-normalised float image and the long label.

Every random draw uses torch's global generator, so wrapping an item in :func:`seeded` makes it a pure function
of its sample seed (exact resume, independent of the number of DataLoader workers).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# ImageNet statistics, which the pretrained backbones expect.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Padding colour: the mean, as uint8, so padded pixels normalise to ~0.
MEAN_UINT8: tuple[int, int, int] = tuple(int(round(255 * m)) for m in MEAN)
_MEAN_255 = torch.tensor(MEAN).view(3, 1, 1) * 255
_INV_STD_255 = 1.0 / (torch.tensor(STD).view(3, 1, 1) * 255)


# ---------------------------------------------------------------------------------------------------------------
# randomness


@contextlib.contextmanager
def seeded(sample_seed: Optional[int]) -> Iterator[None]:
    """Inside, torch's CPU generator restarts from ``sample_seed``; outside, its state is untouched.

    ``None`` leaves the global stream as it is (``ds[i]``; DataLoader workers seed it per worker).
    Only the CPU generator is forked, so a CUDA process's GPU random stream is never disturbed.
    """
    if sample_seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(sample_seed) % (2**63))
        yield


def split_key(key) -> tuple[int, Optional[int]]:
    """``ds[i]`` or ``ds[(i, sample_seed)]`` -> ``(i, sample_seed or None)``."""
    if isinstance(key, (tuple, list)):
        index, sample_seed = key
        return int(index), int(sample_seed)
    return int(key), None


def rand_uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def rand_int(lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (both inclusive)."""
    return int(torch.randint(lo, hi + 1, ()).item())


def coin(p: float) -> bool:
    return p > 0 and torch.rand(()).item() < p


# ---------------------------------------------------------------------------------------------------------------
# geometry


def scaled_size(height: int, width: int, long_side: int, min_side: int = 1) -> tuple[int, int]:
    """(h, w) with the longer side equal to ``long_side`` and the aspect ratio kept (short side >= min_side)."""
    scale = long_side / max(height, width)
    return max(min_side, int(height * scale + 0.5)), max(min_side, int(width * scale + 0.5))


def random_long_side(base_size: int, scale_range: Sequence[float]) -> int:
    """Long side drawn uniformly from ``[lo * base, hi * base]`` (the official random rescale)."""
    lo, hi = scale_range
    return rand_int(int(base_size * lo), int(base_size * hi))


def as_tv(image: torch.Tensor, mask: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """Tag plain tensors so the v2 kernels treat ``[H, W]`` masks as masks (not as 1-channel images)."""
    if not isinstance(image, tv_tensors.Image):
        image = tv_tensors.Image(image)
    if not isinstance(mask, tv_tensors.Mask):
        mask = tv_tensors.Mask(mask)
    return image, mask


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased (as the official ``PIL.Image.resize(..., BICUBIC)``); uint8 stays uint8 (clamped)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.resize(image, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]):
    """Bicubic (antialiased) for the image, nearest for the label, which must never mix class ids.

    NEAREST_EXACT samples the label at pixel centres, as the image is; plain NEAREST (the official cv2
    INTER_NEAREST) shifts label edges by half a source pixel against the image, i.e. 2 pixels at a 4x upscale.
    This is a deliberate difference (FIDELITY.md).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    return resize_image(image, size), F.resize(mask, list(size), interpolation=InterpolationMode.NEAREST_EXACT)


def pad_pair(image: torch.Tensor, mask: torch.Tensor, min_size: int, ignore_index: int):
    """Pad bottom/right to at least ``min_size`` with the mean colour and the ignore label."""
    h, w = image.shape[-2:]
    pad_h, pad_w = max(0, min_size - h), max(0, min_size - w)
    if pad_h == 0 and pad_w == 0:
        return image, mask
    padding = [0, 0, pad_w, pad_h]  # left, top, right, bottom
    image = F.pad(image, padding, fill=list(MEAN_UINT8))
    mask = F.pad(mask, padding, fill=ignore_index)
    return image, mask


def crop_pair(image: torch.Tensor, mask: torch.Tensor, top: int, left: int, size: int):
    return F.crop(image, top, left, size, size), F.crop(mask, top, left, size, size)


def hflip_pair(image: torch.Tensor, mask: torch.Tensor):
    return F.horizontal_flip(image), F.horizontal_flip(mask)


# ---------------------------------------------------------------------------------------------------------------
# photometric augmentation
#
# On CPU these ops are memory-bound, so they run as one chain on a single float [0, 255] buffer, modified in place
# (the ``*_`` functions), instead of uint8 -> float -> uint8 with fresh tensors inside every torchvision op. Each
# follows torchvision's definition; tests/test_transforms.py checks them against torchvision.


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``[1, H, W]`` of a float ``[3, H, W]`` image, torchvision's weights."""
    return torch.mul(x[0], 0.2989).add_(x[1], alpha=0.587).add_(x[2], alpha=0.114).unsqueeze(0)


def adjust_brightness_(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x.mul_(factor).clamp_(0.0, 255.0)


def adjust_contrast_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean grey level of the whole image."""
    channel_mean = x.mean(dim=(1, 2)).tolist()
    mean = 0.2989 * channel_mean[0] + 0.587 * channel_mean[1] + 0.114 * channel_mean[2]
    return x.mul_(factor).add_((1.0 - factor) * mean).clamp_(0.0, 255.0)


def adjust_saturation_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the per-pixel grey level."""
    gray = _gray(x).mul_(1.0 - factor)
    return x.mul_(factor).add_(gray).clamp_(0.0, 255.0)


def adjust_hue_(x: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """Rotate the HSV hue of a float ``[3, H, W]`` image by ``hue_factor`` turns (torchvision's ``adjust_hue``).

    Value ``v = max(r,g,b)`` and chroma ``c = v - min(r,g,b)`` are unchanged by a hue rotation, so the new colour
    has the closed form ``channel_n = v - c * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h') mod 6`` and
    ``n = 5, 3, 1`` for r, g, b, where ``h'`` is the rotated hue in sixths of a turn. A handful of reused buffers
    and no boolean masks: 4-8x faster than torchvision on CPU.
    """
    if hue_factor == 0:
        return x
    r, g, b = x[0], x[1], x[2]
    v = x.amax(dim=0)
    c = x.amin(dim=0)
    torch.sub(v, c, out=c)
    # hue * c, starting from the "blue is the maximum" case and overriding it where green, then red, is
    h = torch.sub(r, g).add_(c, alpha=4.0)
    t = torch.sub(b, r).add_(c, alpha=2.0).sub_(h)
    h.addcmul_(t, _is_max(v, g))
    torch.sub(g, b, out=t).sub_(h)
    h.addcmul_(t, _is_max(v, r))
    h.div_(c.clamp(min=1e-20)).add_(6.0 * (hue_factor % 1.0))  # grey pixels (c == 0) keep v whatever h is
    tmp = torch.empty_like(h)
    for ch, n in enumerate((5.0, 3.0, 1.0)):  # x is free to overwrite now: h, v, c hold all that is needed
        torch.add(h, n, out=t)
        torch.mul(t, 1.0 / 6.0, out=tmp).floor_()
        t.sub_(tmp, alpha=6.0)  # k = (h + n) mod 6
        torch.neg(t, out=tmp).add_(4.0)
        torch.minimum(t, tmp, out=t).clamp_(0.0, 1.0)
        torch.sub(v, t.mul_(c), out=x[ch])
    return x


def _is_max(v: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """1.0 where ``channel == v`` else 0.0 (v >= channel): any float32 gap in [0, 255] times 1e30 exceeds 1."""
    return torch.sub(v, channel).mul_(1e30).clamp_(max=1.0).neg_().add_(1.0)


def color_jitter_(x: torch.Tensor, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1) -> torch.Tensor:
    """ColorJitter on a float [0, 255] image: the four adjustments in a random order, factors drawn uniformly
    as torchvision draws them (brightness/contrast/saturation in [1 - v, 1 + v], hue in [-v, v])."""
    order = torch.randperm(4).tolist()
    factors = [rand_uniform(max(0.0, 1 - brightness), 1 + brightness),
               rand_uniform(max(0.0, 1 - contrast), 1 + contrast),
               rand_uniform(max(0.0, 1 - saturation), 1 + saturation),
               rand_uniform(-hue, hue)]
    ops = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)
    for i in order:
        x = ops[i](x, factors[i])
    return x


def grayscale_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(_gray(x).expand(3, -1, -1))


# cv2.GaussianBlur(image, (5, 5), 0), the official pair blur: for sigma 0 and a 5-tap kernel OpenCV uses its fixed
# binomial table [1, 4, 6, 4, 1] / 16 (not the Gaussian of sigma 1.1 it would compute for other sizes).
BLUR_TAPS_5X5: tuple[float, ...] = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def gaussian_blur_(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a float ``[3, H, W]`` image: kernel radius ceil(3 sigma), reflect padding (torchvision's
    kernel)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    return separable_blur_(x, (weights / weights.sum()).tolist())


def blur_5x5_(x: torch.Tensor) -> torch.Tensor:
    """The official pair blur (:data:`BLUR_TAPS_5X5`, reflect-101 borders as cv2's default) on a float image."""
    return separable_blur_(x, BLUR_TAPS_5X5)


def separable_blur_(x: torch.Tensor, w: Sequence[float]) -> torch.Tensor:
    """Blur a float ``[3, H, W]`` image in place with the symmetric odd-length kernel ``w`` along both axes,
    reflect padding, as shifted adds of the taps (2x faster than depthwise conv2d on CPU)."""
    radius = len(w) // 2
    h, wd = x.shape[-2:]
    p = nnf.pad(x.unsqueeze(0), [radius, radius, radius, radius], mode="reflect")[0]  # [3, H + 2r, W + 2r]
    rows = torch.mul(p[:, :, radius:radius + wd], w[radius])  # [3, H + 2r, W]: the horizontal pass
    for i in range(1, radius + 1):
        rows.add_(p[:, :, radius - i:radius - i + wd], alpha=w[radius + i])
        rows.add_(p[:, :, radius + i:radius + i + wd], alpha=w[radius + i])
    torch.mul(rows[:, radius:radius + h], w[radius], out=x)  # the vertical pass, into x
    for i in range(1, radius + 1):
        x.add_(rows[:, radius - i:radius - i + h], alpha=w[radius + i])
        x.add_(rows[:, radius + i:radius + i + h], alpha=w[radius + i])
    return x


def photometric(image: torch.Tensor, p_blur=0.5, p_jitter=0.8, p_gray=0.2) -> torch.Tensor:
    """Per-crop augmentation of the unlabeled pairs, in the official order: the 5x5 blur (:func:`blur_5x5_`)
    with p=0.5, then ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, then RandomGrayscale p=0.2; the coins are drawn
    in that order too. uint8 ``[3, H, W]`` in, a new float [0, 255] image out (the input is not modified)."""
    x = image.as_subclass(torch.Tensor).to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    if coin(p_blur):
        x = blur_5x5_(x)
    if coin(p_jitter):
        x = color_jitter_(x)
    if coin(p_gray):
        x = grayscale_(x)
    return x


# ---------------------------------------------------------------------------------------------------------------
# to the model


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 or float [0, 255] ``[..., 3, H, W]`` -> float, ImageNet-normalised."""
    x = image.as_subclass(torch.Tensor).float()
    return x.sub(_MEAN_255).mul_(_INV_STD_255)


def normalize_into(image: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`normalize` written into ``out`` (float ``[3, H, W]``), saving a copy per crop."""
    torch.sub(image.as_subclass(torch.Tensor), _MEAN_255, out=out)
    return out.mul_(_INV_STD_255)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised ``[3, H, W]`` or ``[B, 3, H, W]`` -> float RGB in [0, 1], for plotting."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    return (image.detach().float() * std + mean).clamp(0, 1)


def to_model_input(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return normalize(image), mask.as_subclass(torch.Tensor).long()


# ---------------------------------------------------------------------------------------------------------------
# the labeled training recipe


def train_augment(image: torch.Tensor, mask: torch.Tensor, *, crop_size: int, base_size: int,
                  scale_range: Sequence[float] = (0.5, 2.0), ignore_index: int = 255,
                  jitter: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Official labeled recipe: rescale the long side to U[lo, hi] x base, pad (mean / ignore) to the crop,
    random crop, random horizontal flip, optional colour jitter. uint8 in; uint8 out (float [0, 255] with jitter)."""
    image, mask = as_tv(image, mask)
    h, w = image.shape[-2:]
    size = scaled_size(h, w, random_long_side(base_size, scale_range))
    image, mask = resize_pair(image, mask, size)
    image, mask = pad_pair(image, mask, crop_size, ignore_index)
    h, w = image.shape[-2:]
    image, mask = crop_pair(image, mask, rand_int(0, h - crop_size), rand_int(0, w - crop_size), crop_size)
    if coin(0.5):
        image, mask = hflip_pair(image, mask)
    if jitter:
        image = color_jitter_(image.as_subclass(torch.Tensor).to(torch.float32, copy=True))
    return image, mask
