"""NumPy image augmentation and normalisation for the in-memory pipeline.

Augmentations (`config.dataset.augment`): 'inception' (random area 8-100%,
aspect 3/4-4/3 crop, bilinear resize, flip; eval: 87.5% centre crop),
'cifar' (4-pixel zero pad, random crop, flip), 'flip', 'none'. All random
parameters of a batch come from one `np.random.Generator`, in a fixed order.
`NORMALIZE` holds per-channel (mean, std) of images scaled to [0, 1]; the TFDS
path (`tfds_data`) uses the same constants. uint8 images stay uint8 through
the augmentations ('flip', 'cifar', 'none' exactly; 'inception' rounds its
resize) and cross to the device as uint8 (4x fewer bytes than float32); `device_normaliser` is the half of the
pipeline that the jitted train and eval steps run on them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

NORMALIZE = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


def _bilinear_crops(images: np.ndarray, top: np.ndarray, left: np.ndarray, h: np.ndarray,
                    w: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Crops box (top, left, h, w) of each image [B, H, W, C] and resizes it bilinearly.

  Pixel centres are aligned (as `tf.image.resize`, half_pixel_centers); per
  image, two row gathers and two column gathers: O(out_h * (W + out_w) * C).
  float32 out, or uint8 for uint8 images: the float32 resize rounded to the
  nearest grey level, as PIL-based pipelines (timm) and big_vision's
  dtype-keeping resize give (bilinear weights keep values in [0, 255]; each
  pixel moves by at most half a grey level, and the batch crosses to the
  device at a quarter of the float32 bytes, normalised there by
  `device_normaliser`).
  """
  height, width = images.shape[1:3]
  as_uint8 = images.dtype == np.uint8
  out = np.empty((images.shape[0], out_h, out_w) + images.shape[3:],
                 np.uint8 if as_uint8 else np.float32)

  def coords(start, size, n, limit):
    pos = start + (np.arange(n) + 0.5) * (size / n) - 0.5
    pos = np.clip(pos, 0, limit - 1)
    i0 = np.floor(pos).astype(np.int64)
    return i0, np.minimum(i0 + 1, limit - 1), (pos - i0).astype(np.float32)

  for i, img in enumerate(images):
    y0, y1, wy = coords(top[i], h[i], out_h, height)
    x0, x1, wx = coords(left[i], w[i], out_w, width)
    r0 = img[y0].astype(np.float32)
    rows = r0 + (img[y1] - r0) * wy[:, None, None]
    c0 = rows[:, x0]
    v = c0 + (rows[:, x1] - c0) * wx[None, :, None]
    out[i] = np.rint(v, out=v) if as_uint8 else v
  return out


def inception_boxes(rng: np.random.Generator, n: int, height: int, width: int,
                    area: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 10) -> tuple[np.ndarray, ...]:
  """Random crop boxes (top, left, h, w), int[n] each, as in Inception / Goyal et al.

  Up to `attempts` tries of area fraction U(area) and log-uniform aspect ratio;
  images with no valid try get the whole image.
  """
  target = height * width * rng.uniform(*area, (n, attempts))
  logr = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts))
  w = np.round(np.sqrt(target * np.exp(logr))).astype(np.int64)
  h = np.round(np.sqrt(target / np.exp(logr))).astype(np.int64)
  ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = np.argmax(ok, axis=1)
  found = ok[np.arange(n), first]
  h = np.where(found, h[np.arange(n), first], height)
  w = np.where(found, w[np.arange(n), first], width)
  u = rng.uniform(size=(2, n))
  top = np.floor(u[0] * (height - h + 1)).astype(np.int64)
  left = np.floor(u[1] * (width - w + 1)).astype(np.int64)
  return top, left, h, w


def augment_batch(images: np.ndarray, kind: str, rng: np.random.Generator,
                  out_shape: tuple[int, ...]) -> np.ndarray:
  """Training augmentation of a batch of images f32[B, H, W, C] -> f32[B, *out_shape].

  uint8 images stay uint8: 'flip' and 'cifar' only move or zero-pad pixels,
  and 'inception' rounds its bilinear resize back to uint8 (float images
  stay float32, unrounded). The random parameters come from `rng` for the whole batch,
  in a fixed order.
  """
  if kind == "none" or images.ndim != 4:
    return images
  b, height, width = images.shape[:3]
  if kind == "inception":
    top, left, h, w = inception_boxes(rng, b, height, width)
    images = _bilinear_crops(images, top, left, h, w, out_shape[0], out_shape[1])
  elif kind == "cifar":
    pad = 4
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, (2, b))
    rows = (dy[:, None] + np.arange(height)[None])[:, :, None, None]
    cols = (dx[:, None] + np.arange(width)[None])[:, None, :, None]
    images = np.take_along_axis(np.take_along_axis(padded, rows, axis=1), cols, axis=2)
  elif kind != "flip":
    raise ValueError(f"augment={kind!r}; choose one of none, flip, cifar, inception.")
  flip = rng.uniform(size=b) < 0.5
  images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  return np.ascontiguousarray(images, dtype=np.uint8 if images.dtype == np.uint8 else np.float32)


def eval_transform(images: np.ndarray, kind: str, out_shape: tuple[int, ...]) -> np.ndarray:
  """Eval preprocessing: 87.5% centre crop + resize for 'inception', else identity.

  uint8 images stay uint8 (the resize is rounded, as in `augment_batch`).
  """
  if kind != "inception" or images.ndim != 4:
    return images
  b, height, width = images.shape[:3]
  h, w = int(round(0.875 * height)), int(round(0.875 * width))
  full = lambda v: np.full(b, v, np.int64)  # noqa: E731
  return _bilinear_crops(images, full((height - h) // 2), full((width - w) // 2), full(h),
                         full(w), out_shape[0], out_shape[1])


def _check_name(name: str) -> None:
  if name not in ("none", "per_dataset") and name not in NORMALIZE:
    raise ValueError(f"dataset.normalize={name!r}; choose none, per_dataset or "
                     f"{sorted(NORMALIZE)}.")


def _standardise(x: Any, name: str) -> Any:
  if name not in NORMALIZE:
    return x
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZE[name])
  return (x - mean) / std


def normalise(x: np.ndarray, name: str) -> np.ndarray:
  """(x - mean) / std with `NORMALIZE[name]` for float inputs [B, ..., C]; else x unchanged.

  'none' and 'per_dataset' (standardised when loaded) leave x as it is, and so
  do integer inputs (tokens; uint8 images are normalised on the device by
  `device_normaliser`). ValueError for any other unknown name.
  """
  _check_name(name)
  return _standardise(x, name) if x.dtype.kind == "f" else x


def device_normaliser(name: str) -> Callable[[Any], Any]:
  """The normalisation of uint8 images, to run inside the jitted step (NumPy or JAX arrays).

  uint8[B, H, W, C] in [0, 255] -> f32 `(x / 255 - mean) / std` (`NORMALIZE[name]`;
  'none' and 'per_dataset': `x / 255`), the same float32 arithmetic as the TFDS
  path did on the host; any other dtype (float images normalised on the host,
  token ids) passes unchanged. ValueError for an unknown name.
  """
  _check_name(name)

  def fn(x: Any) -> Any:
    if x.dtype != np.uint8:
      return x
    return _standardise(x.astype(np.float32) / np.float32(255.0), name)
  return fn
