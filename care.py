"""CARE: Contrastive Augmentation-induced Rotational Equivariance, in one file.

Gupta, Robinson, Lim, Villar, Jegelka, "Structuring Representation Geometry with
Rotationally Equivariant Contrastive Learning", ICLR 2024 (arXiv 2306.13924).

SimCLR asks two augmented views of an image to land on the same point of the unit
sphere, which teaches the encoder to *forget* the augmentation. CARE keeps SimCLR's loss
and adds one term: when one pair of augmentations (a, a') is applied to a whole group of
images, the embeddings must move by a *rotation* of the sphere. The augmentation stays
visible in the embedding as structured, linear motion instead of being erased:

    L = info_nce(z(t x), z(t' x)) + lam * equivariance_loss(z(a x), z(a' x), group_size)

The file reads top to bottom in the paper's order:
  1. data, held whole as uint8 tensors on the device, and the two-view, group-shared
     augmentation, batched on the device
  2. the encoder: a CIFAR-stem ResNet and the projection head
  3. the losses: InfoNCE and the orthogonal equivariance loss, with the derivation
  4. training: one step, one epoch, checkpoints, the run; the speed benchmark
  5. evaluation: kNN monitor, linear probe, geometry diagnostics
  6. plots
  7. the command line

    python care.py --epochs 200                 # CIFAR-10, ResNet-18, the reference recipe
    python care.py --help
"""
import argparse
import functools
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torchvision.ops import roi_align


class CareError(Exception):
    """A problem with the user's input or environment: reported as one line, no traceback."""

    def __init__(self, message, code=2):          # 2: usage error, 1: anything else
        super().__init__(message)
        self.code = code


# =====================================================================================
# 1. Data: each split held whole, as a uint8 tensor on the training device
# =====================================================================================
# CIFAR-10's 50,000 training images are 150 MB as uint8: they fit on any GPU. Holding
# them there removes the data loader, its worker processes and the per-image PIL
# transforms; a batch is an index into a tensor and augmentation runs on the device.

TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


@dataclass
class Data:
    train_x: torch.Tensor     # (N, 3, S, S) uint8: the self-supervised training images
    train_y: torch.Tensor     # (N,) int64 labels; -1 for unlabelled images (STL-10)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    mean: tuple               # per-channel mean and std of train_x in [0, 1]
    std: tuple


def _square(x, size):
    """Resize the shorter side to `size`, then centre-crop: uint8 (..., 3, H, W) -> size^2."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return TF.center_crop(TF.resize(x, size, antialias=True), size)


def _load_torchvision(name, root, train):
    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    kw = {"split": "train+unlabeled" if train else "test"} if name == "stl10" else {"train": train}
    try:
        ds = cls(root, download=False, **kw)
    except RuntimeError:                        # not downloaded yet
        try:
            ds = cls(root, download=True, **kw)
        except Exception as e:
            reason = _first_line(e)
            raise CareError(
                f"could not download {name} into {root} ({reason}). Offline? Download it on a "
                f"connected machine with python -c \"import torchvision; torchvision.datasets."
                f"{cls.__name__}('data', download=True)\" and copy data/ to --data-root, or "
                f"use --dataset folder --data-root DIR with DIR/train/<class>/ and "
                f"DIR/test/<class>/ image folders", code=1) from None
    x = torch.from_numpy(ds.data)
    x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x          # CIFAR stores HWC
    y = torch.as_tensor(ds.targets if hasattr(ds, "targets") else ds.labels, dtype=torch.long)
    return x.contiguous(), y, list(ds.classes)


def _load_folder(root, split, size, class_to_idx=None):
    """An image folder DIR/<split>/<class>/*.jpg|png -> uint8 images, labels, classes."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise CareError(f"{root} has no {split}/ folder: --dataset folder expects "
                        f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
    ds = torchvision.datasets.folder
    try:
        if class_to_idx is None:
            _, class_to_idx = ds.find_classes(folder)
        samples = ds.make_dataset(folder, class_to_idx, extensions=ds.IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise CareError(f"no images in {folder}: {str(e).splitlines()[0]}") from None
    images = []
    for path, _ in samples:                     # once, at load time
        try:
            img = TF.pil_to_tensor(ds.default_loader(path))           # RGB uint8 (3, H, W)
        except OSError as e:
            raise CareError(f"cannot decode {path}: {str(e).splitlines()[0]}", code=1) from None
        images.append(_square(img, size))
    labels = torch.tensor([c for _, c in samples], dtype=torch.long)
    return torch.stack(images), labels, class_to_idx


def channel_stats(x):
    """Per-channel mean and std of a uint8 image tensor, in [0, 1] units."""
    total = torch.zeros(2, 3, dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.double().div(255).transpose(0, 1).flatten(1)           # (3, pixels)
        total += torch.stack([c.sum(1), c.square().sum(1)])
    mean = total[0] / (x.numel() / 3)
    std = (total[1] / (x.numel() / 3) - mean.square()).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def load_data(dataset, root, image_size, train_subset=0, seed=0, device="cpu"):
    """Load both splits, resize them once to image_size, and put them on `device`."""
    if dataset == "folder":
        if not os.path.isdir(root):
            raise CareError(f"--data-root {root} does not exist (--dataset folder needs "
                            f"DIR/train/<class>/ and DIR/test/<class>/)")
        train_x, train_y, class_to_idx = _load_folder(root, "train", image_size)
        test_x, test_y, _ = _load_folder(root, "test", image_size, class_to_idx)
        classes = list(class_to_idx)
    else:
        train_x, train_y, classes = _load_torchvision(dataset, root, train=True)
        test_x, test_y, _ = _load_torchvision(dataset, root, train=False)
        train_x, test_x = (torch.cat([_square(c, image_size) for c in x.split(4096)])
                           for x in (train_x, test_x))
    if train_subset:                            # a fixed random subset, for quick runs
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        train_x, train_y = train_x[keep[:train_subset]], train_y[keep[:train_subset]]
    mean, std = channel_stats(train_x)
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                classes, mean, std)


# -------------------------------------------------------------------------------------
# 1b. Augmentation: two views, parameters shared within a group
# -------------------------------------------------------------------------------------
# The reference CIFAR recipe (SimCLR's): random resized crop, horizontal flip, colour
# jitter with p=0.8, grayscale with p=0.2, Gaussian blur with p=0.5, normalisation.
# torchvision's transforms work on one image at a time with Python-side randomness; here
# every parameter is a tensor with one entry per image, so a whole batch is augmented by a
# handful of kernels on the device. The colour ops below follow the formulas of
# torchvision.transforms.functional (test_care.py checks each against it); torchvision
# lacks only the per-image *tensor* of factors, which is why they are written out here.

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@functools.lru_cache(maxsize=None)
def _const(values, device):
    """A small constant tensor, made once per device. Building it afresh every step would
    be a host-to-device copy, and such a copy makes the host wait for the GPU."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _per_image(v):
    """(B,) -> (B, 1, 1, 1), to broadcast one number per image over its pixels."""
    return v.view(-1, 1, 1, 1)


def rgb_to_grayscale(x):
    """ITU-R 601-2 luma, as torchvision: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x, y, factor):
    """factor * x + (1 - factor) * y, clipped to [0, 1]: torchvision's `_blend`."""
    return (factor * x + (1 - factor) * y).clamp(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    # Blend towards the image's mean grey level (one scalar per image).
    return _blend(x, rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    # Blend towards the image's own grayscale version.
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x, shift):
    """Rotate the hue channel of HSV by `shift` (a fraction of a turn, in [-0.5, 0.5])."""
    # RGB -> HSV (torchvision's _rgb2hsv, written with torch.where).
    v, _ = x.max(1)
    c = v - x.min(1).values                       # chroma
    c_safe = torch.where(c > 0, c, 1.0)
    r, g, b = x.unbind(1)
    h = torch.where(v == r, (g - b) / c_safe,
                    torch.where(v == g, 2 + (b - r) / c_safe, 4 + (r - g) / c_safe))
    if torch.is_tensor(shift):
        shift = shift.view(-1, 1, 1)
    h = (h / 6 + shift) % 1.0                     # the hue rotation itself
    s = c / torch.where(v > 0, v, 1.0)
    # HSV -> RGB in closed form: channel_n = v - v s clamp(min(k, 4 - k), 0, 1) with
    # k = (n + 6h) mod 6 and n = 5, 3, 1 for R, G, B (the piecewise formula, vectorised).
    k = (_const((5.0, 3.0, 1.0), x.device).view(1, 3, 1, 1) + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x, sigma):
    """3x3 Gaussian blur with one sigma per image, reflect padding (as torchvision)."""
    side = torch.exp(-0.5 / sigma.square())                     # exp(-t^2 / 2 sigma^2), t = 1
    w = torch.stack([side, torch.ones_like(side), side], 1) / (1 + 2 * side)[:, None]
    # The 2-D kernel is separable: blur along rows, then along columns. Each pass is a
    # weighted sum of three shifted copies of the padded batch.
    H, W = x.shape[2:]
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    p = sum(_per_image(w[:, i]) * p[:, :, i:i + H, :] for i in range(3))
    return sum(_per_image(w[:, i]) * p[:, :, :, i:i + W] for i in range(3))


def random_resized_crop(x, u_scale, u_ratio, u_pos, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop for a batch: one box per image, resized back to (H, W).

    Like torchvision, try 10 (area, aspect) draws and keep the first that fits inside the
    image, falling back to the whole image. Boxes keep real-valued corners (torchvision
    rounds to whole pixels) and roi_align samples them bilinearly at the output pixel
    centres, which is torchvision's bilinear resize of the crop except within half an
    input pixel of the box edge, where roi_align reads the neighbouring pixels instead of
    repeating the edge.
    """
    B, _, H, W = x.shape
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u_scale)          # (B, 10)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u_ratio)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= W) & (h <= H)
    first = fits.int().argmax(1, keepdim=True)                           # first fitting try
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], W)
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], H)
    x0, y0 = (W - w) * u_pos[:, 0], (H - h) * u_pos[:, 1]
    idx = torch.arange(B, device=x.device, dtype=x.dtype)
    boxes = torch.stack([idx, x0, y0, x0 + w, y0 + h], 1)
    return roi_align(x, boxes, output_size=(H, W), spatial_scale=1.0, sampling_ratio=1,
                     aligned=True)


def normalize(x, mean, std):
    """Per-channel (x - mean) / std, the last step of every view."""
    return (x - _const(tuple(mean), x.device).view(1, 3, 1, 1)) / _const(
        tuple(std), x.device).view(1, 3, 1, 1)


def augment(x, group_size, generator=None, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """Augment a float batch (B, 3, H, W) in [0, 1]; returns normalised views, same shape.

    Parameters are drawn once per group of `group_size` consecutive images and shared by
    the whole group: that gives the pairs (a x_1, ..., a x_n) the equivariance loss needs.
    group_size=1 gives ordinary per-image SimCLR views. Every call draws fresh parameters.
    """
    B, _, H, W = x.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} images is not a multiple of group_size={group_size}")
    # One row of 31 uniforms per group, repeated for each image of the group.
    dev = generator.device if generator is not None else x.device
    u = torch.rand(B // group_size, 1, 31, device=dev, generator=generator).to(x.device)
    u = u.expand(-1, group_size, -1).reshape(B, 31)
    x = random_resized_crop(x, u[:, 0:10], u[:, 10:20], u[:, 20:22])
    x = torch.where(_per_image(u[:, 22] < 0.5), x.flip(3), x)
    # Colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8. Simplification: torchvision applies
    # the four ops in a random order per call; here the order is fixed (b, c, s, h).
    b, c, s = (_per_image(0.6 + 0.8 * u[:, i]) for i in (23, 24, 25))   # U(0.6, 1.4)
    hue = -0.1 + 0.2 * u[:, 26]                                         # U(-0.1, 0.1)
    jittered = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(x, b), c), s), hue)
    x = torch.where(_per_image(u[:, 27] < 0.8), jittered, x)
    x = torch.where(_per_image(u[:, 28] < 0.2), rgb_to_grayscale(x).expand_as(x), x)
    x = torch.where(_per_image(u[:, 29] < 0.5), gaussian_blur(x, 0.1 + 1.9 * u[:, 30]), x)
    return normalize(x, mean, std)


# =====================================================================================
# 2. The encoder: backbone h and projection head g
# =====================================================================================
ARCHS = ("resnet18", "resnet34", "resnet50")


class Encoder(nn.Module):
    """x -> (h, z): backbone features h (for evaluation) and unit projection z (for losses).

    A torchvision ResNet with the CIFAR stem: 32x32 images are too small for the ImageNet
    stem (7x7 stride-2 conv + max-pool would shrink them 4x before the first block), so
    conv1 becomes 3x3 stride 1 and the max-pool goes. The classifier is dropped; h is the
    pooled feature (512-d for ResNet-18/34, 2048-d for ResNet-50).
    """

    def __init__(self, arch="resnet18", feature_dim=128):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.dim = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.head = nn.Sequential(nn.Linear(self.dim, 512, bias=False), nn.BatchNorm1d(512),
                                  nn.ReLU(inplace=True), nn.Linear(512, feature_dim))

    def forward(self, x):
        h = self.backbone(x)
        z = F.normalize(self.head(h).float(), dim=1)   # the sphere lives in float32
        return h, z


# =====================================================================================
# 3. The losses
# =====================================================================================
def info_nce(z1, z2, temperature=0.5):
    """NT-Xent over the 2B views: each view must pick out its partner among the 2B - 1.

    For view i with positive p(i), l_i = -log softmax_k(s_ik / tau)[p(i)], k != i, with
    s_ik = <z_i, z_k>. That is exactly cross-entropy over the similarity logits with the
    diagonal removed (set to -inf) and target p(i) = i + B (mod 2B).

    The numerator *aligns* the two views; the log-sum-exp over all other views spreads the
    embeddings out (uniformity on the sphere). CARE needs the second half: see below.
    """
    z = torch.cat([z1, z2]).float()
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.arange(n, device=z.device).roll(n // 2)
    return F.cross_entropy(logits, targets)


# The orthogonal equivariance loss, and why it works.
#
# Take a group of n images x_1..x_n, all moved by the same augmentation pair (a, a').
# Stack the embeddings as rows: Z = [z(a x_i)]_i and Z' = [z(a' x_i)]_i, both (n, d), and
# form the Gram matrices G = Z Z^T and G' = Z' Z'^T: all pairwise inner products.
#
# (1) A rotation leaves the Gram matrix unchanged. If z(a' x) = R z(a x) for one
#     orthogonal R and every x of the group, then Z' = Z R^T and
#         G' = Z R^T R Z^T = Z Z^T = G        (R^T R = I).
#     So the loss sum_{i != j} (G_ij - G'_ij)^2 is zero. It never names R: it only asks
#     that *some* rotation exist. No map is learned, the cost is O(n^2 d) per group, and
#     the loss cannot see an orthogonal change of basis applied to both views, nor a
#     reordering of the group's images done the same way in both.
#
# (2) Equal Gram matrices force a rotation. G = G' says the map z(a x_i) -> z(a' x_i)
#     keeps every length and every angle; a map that preserves all inner products is an
#     isometry of the span of the rows and extends to an orthogonal matrix of R^d.
#     Constructively: the orthogonal Procrustes problem min_R ||Z R^T - Z'|| is solved by
#     R = V U^T from the SVD Z^T Z' = U S V^T, and its residual is zero exactly when
#     G = G'. So the loss is zero iff each augmentation pair acts on the group as a
#     rotation (the paper proves the population version).
#
# (3) Alone, this loss collapses: a constant encoder makes every entry of both Gram
#     matrices 1. InfoNCE's denominator (uniformity) prevents that. Its numerator pulls
#     t x and t' x together, i.e. asks the rotation to be *small*: CARE sits between
#     invariance (R = I, SimCLR) and free equivariance.
#
# (4) lam trades the two off. lam = 0 is SimCLR: augmentations are erased. As lam grows
#     the encoder is pushed to keep augmentations (colour, crop) as rotations, which keeps
#     information SimCLR throws away; too large and the rotation term crowds out
#     alignment. The reference uses lam = 0.03 on CIFAR-10.
#
# The diagonal of G - G' is zero for unit vectors, so leaving it out changes nothing
# there; the scaling 2/n (twice the mean over rows) is the reference implementation's.
def equivariance_loss(z1, z2, group_size):
    """Mean over groups of (2/n) sum_{i != j} (G_ij - G'_ij)^2, n = group_size.

    Rows [k n, (k+1) n) of z1 and z2 are group k: the same images under a and under a'.
    """
    B, d = z1.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} embeddings is not a multiple of group_size={group_size}")
    n = group_size
    Z = torch.cat([z1, z2]).float().view(-1, n, d)       # (2 * groups, n, d)
    gram = torch.bmm(Z, Z.mT)                            # one bmm for G and G'
    G, G_prime = gram.chunk(2)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z1.device)
    return (2 / n) * ((G - G_prime).square() * off_diagonal).sum((1, 2)).mean()


# =====================================================================================
# 4. Training
# =====================================================================================
def train_step(model, optimizer, images, cfg, generator, mean, std):
    """One step on a uint8 batch; returns [loss, info_nce, equivariance] on the device.

    CARE makes four views per image, as the reference does: two per-image views (t x,
    t' x) for InfoNCE and two group-shared views (a x, a' x) for the equivariance loss.
    SimCLR makes only the first two. All views go through the encoder as one batch (the
    reference runs four forward passes, so its BatchNorm statistics are per view set).
    """
    x = images.float().div_(255)
    views = [augment(x, 1, generator, mean, std) for _ in range(2)]
    if cfg.method == "care":
        views += [augment(x, cfg.group_size, generator, mean, std) for _ in range(2)]
    v = torch.cat(views)
    if v.is_cuda:
        v = v.contiguous(memory_format=torch.channels_last)
    with torch.autocast(v.device.type, dtype=torch.bfloat16, enabled=v.is_cuda):
        _, z = model(v)
    z = z.float().chunk(len(views))                     # the losses run in float32
    nce = info_nce(z[0], z[1], cfg.temperature)
    equi = (equivariance_loss(z[2], z[3], cfg.group_size) if cfg.method == "care"
            else torch.zeros((), device=v.device))
    loss = nce + cfg.lam * equi
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss, nce, equi]).detach()


def make_optimizer(model, cfg, steps_per_epoch):
    """Adam (the reference) or SGD, with a constant or warm-up + cosine learning rate."""
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9,
                              weight_decay=cfg.weight_decay)
    warm, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def lr_factor(step):
        if cfg.lr_schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def build_model(cfg, device):
    """The encoder (channels_last on CUDA), and the module training calls: the same
    encoder, compiled with --compile. Evaluation uses the plain one."""
    model = Encoder(cfg.arch, cfg.feature_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.compile(model, dynamic=False) if cfg.compile else model


def train_epoch(model, optimizer, scheduler, data, cfg, generator, epoch):
    """One pass over the training images in a fresh random order; returns the epoch's row.

    Losses stay on the device, one row per step; the host reads them once per log
    interval, so the GPU never waits for Python in between.
    """
    N, B = len(data.train_x), cfg.batch_size
    steps = N // B                                      # the last partial batch is dropped
    order = torch.randperm(N, device=data.train_x.device, generator=generator)
    losses = torch.zeros(steps, 3, device=data.train_x.device)
    live, read, t0 = sys.stdout.isatty(), 0, time.time()
    last_line = t0
    for step in range(steps):
        idx = order[step * B:(step + 1) * B]            # consecutive images: random groups
        losses[step] = train_step(model, optimizer, data.train_x[idx], cfg, generator,
                                  data.mean, data.std)
        scheduler.step()
        if (step + 1) % cfg.log_every and step + 1 < steps:
            continue
        seen = losses[read:step + 1].cpu()              # the one host sync per interval
        bad = (~torch.isfinite(seen)).any(1).nonzero()
        if len(bad):
            kept = (f"{cfg.out} keeps the checkpoint of epoch {epoch - 1}" if epoch > 1
                    else "no checkpoint had been written yet")
            raise CareError(f"non-finite loss at epoch {epoch} step {read + int(bad[0]) + 1}/"
                            f"{steps}: stopped; {kept}. Try a lower --lr", code=1)
        read, elapsed = step + 1, time.time() - t0
        per_step = elapsed / (step + 1)
        eta = per_step * (steps - step - 1)
        line = (f"epoch {epoch}/{cfg.epochs} step {step + 1}/{steps} loss "
                f"{seen[-1, 0].item():.4f} | {(step + 1) * B / elapsed:.0f} img/s | eta epoch "
                f"{_hms(eta)}, run {_hms(eta + per_step * steps * (cfg.epochs - epoch))}")
        if live:
            print("\r" + line.ljust(100), end="", flush=True)
        elif time.time() - last_line > 30:              # in a log file: a line per 30 s
            print(line, flush=True)
            last_line = time.time()
    if live:
        print("\r" + " " * 100 + "\r", end="", flush=True)
    seconds = time.time() - t0
    loss, nce, equi = losses.mean(0).tolist()
    return {"epoch": epoch, "loss": loss, "info_nce": nce,
            "equivariance": equi if cfg.method == "care" else None, "knn_top1": None,
            "images_per_s": steps * B / seconds, "seconds": seconds,
            "lr": scheduler.get_last_lr()[0]}


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash or Ctrl-C never leaves half a file."""
    tmp = f"{path}.tmp"
    try:
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=1)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CareError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CareError(f"--resume {path}: cannot read it as a checkpoint "
                        f"({_first_line(e)[:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch", "rng"} <= ckpt.keys():
        raise CareError(f"--resume {path}: not a care.py checkpoint")
    return ckpt


def restore(ckpt, model, optimizer, scheduler, generator, log):
    """Load weights, optimizer and scheduler state, and every random stream."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CareError(f"--resume: the checkpoint does not fit this model "
                        f"({_first_line(e)[:160]})") from None
    rng = ckpt["rng"]
    if rng["device"] != generator.device.type:
        log(f"note: the checkpoint's random stream is {rng['device']}'s; on "
            f"{generator.device.type} the run continues with a fresh one")
        return
    generator.set_state(rng["generator"])       # data order and every augmentation
    torch.set_rng_state(rng["torch"])


def _first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]


def _hms(s):
    return f"{int(s) // 3600}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}"


def logger(path):
    """print(), and append the same line to the run's log file."""
    def log(msg=""):
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":")[1].strip() for l in open("/proc/cpuinfo")
                    if l.startswith("model name")), cpu)
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


HEADER = "epoch |    loss | info_nce | equivariance | kNN top-1 |  img/s |    time"


def table_row(r):
    f = lambda key, spec, unit="": "-" if r[key] is None else format(r[key], spec) + unit
    return (f"{r['epoch']:>5} | {f('loss', '.4f'):>7} | {f('info_nce', '.4f'):>8} | "
            f"{f('equivariance', '.5f'):>12} | {f('knn_top1', '.2f', '%'):>9} | "
            f"{f('images_per_s', '.0f'):>6} | {f('seconds', '.1f', 's'):>7}")


def run(cfg, ckpt=None):
    """Train (or with --eval-only just evaluate), recording everything under cfg.out."""
    device = pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    log = logger(os.path.join(cfg.out, "train.log"))
    ckpt_path, metrics_path = (os.path.join(cfg.out, f) for f in ("checkpoint.pt", "metrics.json"))
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True          # autotune convolutions for fixed shapes
    log(f"care.py | {cfg.method} | {cfg.dataset} {cfg.image_size}px | {cfg.arch} | "
        f"{device_name(device)} | out: {cfg.out}")
    t = time.time()
    data = load_data(cfg.dataset, cfg.data_root, cfg.image_size, cfg.train_subset, cfg.seed, device)
    if len(data.train_x) < cfg.batch_size:
        raise CareError(f"the training split has {len(data.train_x)} images, fewer than "
                        f"--batch-size {cfg.batch_size}")
    log(f"data: {len(data.train_x)} train / {len(data.test_x)} test images, "
        f"{len(data.classes)} classes, loaded in {time.time() - t:.1f}s")

    model, train_model = build_model(cfg, device)
    optimizer, scheduler = make_optimizer(model, cfg, len(data.train_x) // cfg.batch_size)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    metrics = {"config": vars(cfg), "device": device_name(device), "world_size": 1,
               "wall_time_s": 0.0, "linear_top1": None, "epochs": []}
    start, elapsed, feats = 1, 0.0, None
    if ckpt is not None:
        restore(ckpt, model, optimizer, scheduler, generator, log)
        start, elapsed = ckpt["epoch"] + 1, ckpt["metrics"]["wall_time_s"]
        metrics["epochs"] = [r for r in ckpt["metrics"]["epochs"] if r["epoch"] <= ckpt["epoch"]]
        log(f"resumed from {cfg.resume} after epoch {ckpt['epoch']}")
    t0 = time.time()

    if not cfg.eval_only:
        log(HEADER)
        for row in metrics["epochs"]:                   # the story so far, when resuming
            log(table_row(row))
        if start == 1:                                  # epoch 0: the untrained encoder
            feats = features(model, data)
            metrics["epochs"].append({"epoch": 0, "loss": None, "info_nce": None,
                                      "equivariance": None, "knn_top1": knn_top1(*feats, k=cfg.knn_k),
                                      "images_per_s": None, "seconds": None})
            log(table_row(metrics["epochs"][0]))
        saved = epoch = start - 1
        try:
            for epoch in range(start, cfg.epochs + 1):
                row = train_epoch(train_model, optimizer, scheduler, data, cfg, generator, epoch)
                feats = None
                if epoch % cfg.knn_every == 0 or epoch == cfg.epochs:
                    feats = features(model, data)
                    row["knn_top1"] = knn_top1(*feats, k=cfg.knn_k)
                metrics["epochs"].append(row)
                metrics["wall_time_s"] = elapsed + time.time() - t0
                atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch,
                             "config": vars(cfg), "metrics": metrics,
                             "rng": {"device": device.type, "generator": generator.get_state(),
                                     "torch": torch.get_rng_state()}}, ckpt_path)
                saved = epoch
                atomic_save(metrics, metrics_path)
                log(table_row(row))
        except KeyboardInterrupt:                       # Ctrl-C or SIGTERM
            if sys.stdout.isatty():
                print()                                 # end the live progress line
            metrics["epochs"] = [r for r in metrics["epochs"] if r["epoch"] <= saved]
            if saved >= 1:
                atomic_save(metrics, metrics_path)      # in step with the checkpoint
            log(f"interrupted during epoch {epoch}: " + (
                f"{ckpt_path} and {metrics_path} hold epoch {saved}; continue with: "
                f"python care.py --resume {ckpt_path}" if saved >= 1
                else "no epoch had finished, nothing to resume"))
            raise SystemExit(130)

    # Final evaluation: linear probe on the last features (extracted once), geometry.
    feats = feats or features(model, data)
    t = time.time()
    metrics["linear_top1"] = linear_probe(*feats, epochs=cfg.probe_epochs, seed=cfg.seed)
    log(f"linear probe top-1: {metrics['linear_top1']:.2f}% "
        f"({cfg.probe_epochs} epochs on frozen features, {time.time() - t:.1f}s)")
    metrics["diagnostics"] = geometry_diagnostics(model, data)
    for line in diagnostics_lines(metrics["diagnostics"]):
        log(line)
    metrics["wall_time_s"] = elapsed + time.time() - t0
    atomic_save(metrics, metrics_path)
    draw_run(metrics, cfg.out)
    log(f"done in {_hms(metrics['wall_time_s'])}: {metrics_path}, curves.png, geometry.png")
    return metrics


def benchmark(cfg):
    """--benchmark: time full training steps against bare network steps.

    A bare step is the network alone: encoder + head forward and backward on views made
    beforehand, a trivial loss, the same optimizer. The ratio full / bare is what the
    augmentation, the two losses and the bookkeeping add on top of the network.
    """
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    B, S = cfg.batch_size, cfg.image_size
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, device=device)
    model, net = build_model(cfg, device)
    optimizer, _ = make_optimizer(model, cfg, 1)
    g = torch.Generator(device).manual_seed(cfg.seed)
    n_views = 4 if cfg.method == "care" else 2
    views = torch.cat([augment(images.float() / 255, 1 if i < 2 else cfg.group_size, g)
                       for i in range(n_views)])

    def bare():
        _, z = _forward(net, views)
        optimizer.zero_grad(set_to_none=True)
        z.mean().backward()
        optimizer.step()

    def full(method):
        c = argparse.Namespace(**{**vars(cfg), "method": method})
        return lambda: train_step(net, optimizer, images, c, g, CIFAR10_MEAN, CIFAR10_STD)

    kinds = {"care": full("care"), "simclr": full("simclr"), "bare": bare}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in kinds}
    for i in range(cfg.bench_warmup + cfg.bench_steps):  # interleaved: equal conditions
        for kind, step in kinds.items():
            sync()
            t = time.perf_counter()
            step()
            sync()
            if i >= cfg.bench_warmup:
                times[kind].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result = {"care_step_s": med["care"], "simclr_step_s": med["simclr"],
              "bare_step_s": med["bare"], "overhead_ratio": med[cfg.method] / med["bare"],
              "care_simclr_ratio": med["care"] / med["simclr"],
              "images_per_s": B / med[cfg.method], "device": device_name(device),
              "config": vars(cfg)}
    os.makedirs(cfg.out, exist_ok=True)
    atomic_save(result, os.path.join(cfg.out, "benchmark.json"))
    print(f"benchmark: {cfg.arch}, batch {B} x {S}px, {result['device']}, median of "
          f"{cfg.bench_steps} steps after {cfg.bench_warmup} warm-up\n"
          f"  full {cfg.method:<6} step: augment {n_views} x {B} views, forward, losses, backward, "
          f"{cfg.optimizer} {med[cfg.method] * 1e3:9.1f} ms\n"
          f"  bare step: forward, backward, {cfg.optimizer} on {n_views} x {B} ready views"
          f"{' ' * 13}{med['bare'] * 1e3:9.1f} ms\n"
          f"  overhead ratio {result['overhead_ratio']:.3f} | CARE / SimCLR step time "
          f"{result['care_simclr_ratio']:.2f} | {result['images_per_s']:.0f} images/s -> "
          f"{os.path.join(cfg.out, 'benchmark.json')}")
    return result


# =====================================================================================
# 5. Evaluation
# =====================================================================================
def _forward(model, x):
    """Encoder forward for evaluation: bf16 and channels_last on CUDA, float32 out."""
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        h, z = model(x)
    return h.float(), z


@torch.no_grad()
def embed(model, images, mean, std, batch_size=1024):
    """Backbone features h and projections z of un-augmented uint8 images."""
    was_training = model.training
    model.eval()
    hs, zs = zip(*(_forward(model, normalize(c.float() / 255, mean, std))
                   for c in images.split(batch_size)))
    model.train(was_training)
    return torch.cat(hs), torch.cat(zs)


def features(model, data):
    """(train_h, train_y, test_h, test_y) on the labelled images, for kNN and the probe."""
    labelled = data.train_y >= 0
    train_h, _ = embed(model, data.train_x[labelled], data.mean, data.std)
    test_h, _ = embed(model, data.test_x, data.mean, data.std)
    return train_h, data.train_y[labelled], test_h, data.test_y


@torch.no_grad()
def knn_top1(train_h, train_y, test_h, test_y, k=200, temperature=0.5, chunk=1024):
    """Weighted kNN (the InstDisc/SimCLR monitor): the k most cosine-similar training
    images vote for their class with weight exp(sim / temperature). Top-1 in percent."""
    bank = F.normalize(train_h, dim=1)
    classes, k = int(train_y.max()) + 1, min(k, len(bank))
    correct = torch.zeros((), device=bank.device)
    for q, y in zip(F.normalize(test_h, dim=1).split(chunk), test_y.split(chunk)):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), classes, device=q.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == y).sum()
    return 100 * correct.item() / len(test_y)


def linear_probe(train_h, train_y, test_h, test_y, epochs=100, batch_size=256, lr=1e-3, seed=0):
    """Linear evaluation: a linear layer trained with Adam on frozen, un-augmented
    backbone features (standardised with the training statistics). Test top-1 in percent."""
    mu, sd = train_h.mean(0), train_h.std(0) + 1e-6
    x_train, x_test = (train_h - mu) / sd, (test_h - mu) / sd
    clf = nn.Linear(x_train.shape[1], int(train_y.max()) + 1).to(x_train.device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator(x_train.device).manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), device=x_train.device, generator=g).split(batch_size):
            loss = F.cross_entropy(clf(x_train[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100 * (clf(x_test).argmax(1) == test_y).float().mean().item()


# Geometry diagnostics: does an augmentation act on the embedding as a rotation?
# K fixed augmentation pairs (a, a'), each applied to the same N test images, give
# Z = z(a x) and Z' = z(a' x). CARE's loss says Z Z^T = Z' Z'^T, i.e. Z' = Z R^T for an
# orthogonal R. We measure how far that holds, against two reference maps: the identity
# (pure invariance, SimCLR's ideal) and an unconstrained linear map (the most a linear
# map can explain). Always: linear <= rotation <= identity.
HUE_SHIFTS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def residuals(Z, Z2):
    """Share of the variance of Z' left unexplained by Z itself, by the best rotation
    of Z (orthogonal Procrustes) and by the best linear map of Z (least squares)."""
    Z, Z2 = Z.double().cpu(), Z2.double().cpu()
    total = (Z2 - Z2.mean(0)).square().sum()
    U, _, Vh = torch.linalg.svd(Z.T @ Z2)          # Z^T Z' = U S V^T -> Q = U V^T
    maps = {"identity": torch.eye(Z.shape[1], dtype=Z.dtype), "procrustes": U @ Vh,
            "linear": torch.linalg.lstsq(Z, Z2).solution}
    return {f"{k}_residual": ((Z @ M - Z2).square().sum() / total).item() for k, M in maps.items()}


def gram_error(Z, Z2):
    """Mean squared off-diagonal difference of Z Z^T and Z' Z'^T."""
    Z, Z2 = Z.double().cpu(), Z2.double().cpu()
    off = ~torch.eye(len(Z), dtype=torch.bool)
    return (Z @ Z.T - Z2 @ Z2.T).square()[off].mean().item()


@torch.no_grad()
def geometry_diagnostics(model, data, n_images=512, n_pairs=8, seed=0):
    """gram_error, the three residuals (means over K pairs) and hue_cosine by shift."""
    was_training = model.training
    model.eval()
    g = torch.Generator(data.test_x.device).manual_seed(seed)
    pick = torch.randperm(len(data.test_x), device=data.test_x.device, generator=g)[:n_images]
    x = data.test_x[pick].float() / 255
    out = {"images": len(x), "pairs": n_pairs, "gram_error": 0.0, "identity_residual": 0.0,
           "procrustes_residual": 0.0, "linear_residual": 0.0}
    for _ in range(n_pairs):                            # group_size = all: one (a, a')
        _, Z = _forward(model, augment(x, len(x), g, data.mean, data.std))
        _, Z2 = _forward(model, augment(x, len(x), g, data.mean, data.std))
        for k, v in {"gram_error": gram_error(Z, Z2), **residuals(Z, Z2)}.items():
            out[k] += v / n_pairs
    # Colour sensitivity: cosine between h(x) and h(x with its hue turned by delta).
    h, _ = _forward(model, normalize(x, data.mean, data.std))
    out["hue_cosine"] = {str(d): F.cosine_similarity(h, _forward(model, normalize(
        adjust_hue(x, d), data.mean, data.std))[0]).mean().item() for d in HUE_SHIFTS}
    model.train(was_training)
    return out


def diagnostics_lines(d):
    return [f"geometry on {d['images']} test images x {d['pairs']} augmentation pairs: "
            f"gram error {d['gram_error']:.4f}",
            f"  residual share of z(a'x) given z(ax): identity {d['identity_residual']:.3f}, "
            f"rotation {d['procrustes_residual']:.3f}, linear {d['linear_residual']:.3f}",
            "  hue cosine of h: " + "  ".join(f"{k}: {v:.3f}" for k, v in d["hue_cosine"].items())]


# =====================================================================================
# 6. Plots (matplotlib, headless): one run, or several runs overlaid
# =====================================================================================
def summary(m):
    """The numbers a reader compares between runs, from one metrics.json."""
    d, knn = m.get("diagnostics") or {}, [r["knn_top1"] for r in m["epochs"] if r["knn_top1"] is not None]
    return {"kNN %": knn[-1] if knn else None, "linear %": m.get("linear_top1"),
            "Gram err": d.get("gram_error"), "Procrustes": d.get("procrustes_residual"),
            "hue cos 0.5": d.get("hue_cosine", {}).get("0.5"), "wall min": m["wall_time_s"] / 60}


def _curve(ax, runs, key, title, ylabel):
    for label, m in runs:
        pts = [(r["epoch"], r[key]) for r in m["epochs"] if r.get(key) is not None]
        ax.plot(*(zip(*pts) if pts else ([], [])), marker="o" if len(pts) < 30 else None, ms=3,
                label=label if pts else f"{label} (not computed)")
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)


def _residual_bars(ax, runs):
    width = 0.8 / len(runs)
    for i, (label, m) in enumerate(runs):
        d = m.get("diagnostics") or {}
        ax.bar([j + i * width for j in range(3)],
               [d.get(f"{k}_residual", 0) for k in ("identity", "procrustes", "linear")], width,
               label=f"{label} (Gram error {d.get('gram_error', float('nan')):.4f})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(3)],
                  ["identity\n(invariance)", "best rotation\n(Procrustes)", "best linear\nmap"])
    ax.set(title="How well z(a x) predicts z(a' x)", ylabel="unexplained share of variance")


def _hue_curve(ax, runs):
    for label, m in runs:
        hue = (m.get("diagnostics") or {}).get("hue_cosine", {})
        ax.plot([float(k) for k in hue], list(hue.values()), marker="o", label=label)
    ax.set(title="Colour sensitivity: cos(h(x), h(hue-shifted x))",
           xlabel="hue shift (fraction of a turn)", ylabel="mean cosine similarity")


def _summary_text(ax, runs):
    ax.axis("off")
    ax.set_title("Final numbers")
    ax.text(0, 1, "\n\n".join(label + "".join(
        f"\n  {k:<12}{'-' if v is None else f'{v:.4g}'}" for k, v in summary(m).items())
        for label, m in runs), va="top", family="monospace", fontsize=8)


PANELS = {"info_nce": lambda ax, r: _curve(ax, r, "info_nce", "InfoNCE loss (training)", "loss"),
          "equivariance": lambda ax, r: _curve(ax, r, "equivariance",
                                               "Equivariance loss (training)", "loss"),
          "knn": lambda ax, r: _curve(ax, r, "knn_top1", "kNN top-1 on the test split", "%"),
          "residuals": _residual_bars, "hue": _hue_curve, "summary": _summary_text}


def plot(runs, path, rows, title):
    """Draw panels for runs = [(label, metrics), ...]; rows = [[panel names], ...]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = max(map(len, rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.6 * cols, 3.8 * len(rows)), squeeze=False)
    for ax_row, names in zip(axes, rows):
        for ax, name in zip(ax_row, names):
            PANELS[name](ax, runs)
            if name != "summary":
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_title(m):
    c = m["config"]
    subset = f" ({c['train_subset']} images)" if c["train_subset"] else ""
    return (f"{c['method'].upper()} | {c['arch']} | {c['dataset']} {c['image_size']}px{subset} | "
            f"{c['epochs']} epochs, batch {c['batch_size']} | {m['device']}")


def draw_run(metrics, out):
    runs, title = [(metrics["config"]["method"].upper(), metrics)], run_title(metrics)
    plot(runs, os.path.join(out, "curves.png"), [["info_nce", "equivariance", "knn"]], title)
    plot(runs, os.path.join(out, "geometry.png"), [["residuals", "hue"]], title)


def compare(dirs, out):
    """--compare: overlay runs' curves and geometry into out/compare.png; print a table."""
    runs = []
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "metrics.json")):
            raise CareError(f"--compare {d}: no metrics.json there")
        with open(os.path.join(d, "metrics.json")) as f:
            m = json.load(f)
        runs.append((f"{m['config']['method'].upper()}: {os.path.basename(os.path.normpath(d))}", m))
    os.makedirs(out, exist_ok=True)
    plot(runs, os.path.join(out, "compare.png"),
         [["info_nce", "equivariance", "knn"], ["residuals", "hue", "summary"]],
         "\n".join(run_title(m) for _, m in runs))
    print(f"{'run':<30}" + "".join(f"{k:>12}" for k in summary(runs[0][1])))
    for label, m in runs:
        print(f"{label:<30}" + "".join(f"{'-' if v is None else f'{v:.4g}':>12}"
                                       for v in summary(m).values()))
    print(f"figure: {os.path.join(out, 'compare.png')}")


# =====================================================================================
# 7. Command line
# =====================================================================================
class Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line, no usage block
        print(f"care.py: error: {message} (see python care.py --help)", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = Parser(description="CARE / SimCLR self-supervised training, evaluation and figures "
               "in one file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("method").add_argument
    a("--method", choices=["care", "simclr"], default="care",
      help="care: InfoNCE + lam * equivariance loss; simclr: InfoNCE only (lam = 0)")
    a("--lam", type=float, default=0.03, help="weight lambda of the equivariance loss")
    a("--group-size", type=int, default=16,
      help="images per group sharing one augmentation pair (a, a'); divides --batch-size")
    a("--temperature", type=float, default=0.5, help="InfoNCE temperature tau")
    a("--arch", choices=ARCHS, default="resnet18", help="backbone (CIFAR stem)")
    a("--feature-dim", type=int, default=128, help="dimension of the projection z")
    a = p.add_argument_group("data").add_argument
    a("--dataset", choices=[*TORCHVISION_DATASETS, "folder"], default="cifar10",
      help="a torchvision dataset (downloaded into --data-root), or an image folder")
    a("--data-root", default="./data",
      help="download folder, or for --dataset folder a DIR with train/<class>/ and test/<class>/")
    a("--image-size", type=int, default=32, help="images are resized once, at load time")
    a("--train-subset", type=int, default=0,
      help="train on a fixed random subset of N images (0: all), for quick runs")
    a = p.add_argument_group("optimisation").add_argument
    a("--epochs", type=int, default=200, help="training epochs (0: evaluate the initial encoder)")
    a("--batch-size", type=int, default=256, help="images per step (CARE: 4 views each)")
    a("--optimizer", choices=["adam", "sgd"], default="adam", help="sgd uses momentum 0.9")
    a("--lr", type=float, default=1e-3, help="learning rate")
    a("--weight-decay", type=float, default=1e-6, help="L2 weight decay of the optimizer")
    a("--lr-schedule", choices=["constant", "cosine"], default="constant",
      help="cosine: linear warm-up, then cosine decay to 0 at --epochs")
    a("--warmup-epochs", type=int, default=10, help="warm-up length for --lr-schedule cosine")
    a("--seed", type=int, default=0, help="seeds the model, data order, augmentation, subset")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    a("--compile", action="store_true", help="torch.compile the encoder for training")
    a = p.add_argument_group("evaluation and output").add_argument
    a("--knn-every", type=int, default=10, help="kNN monitor every N epochs (and at the end)")
    a("--knn-k", type=int, default=200, help="neighbours in the weighted kNN")
    a("--probe-epochs", type=int, default=100, help="epochs of the final linear probe")
    a("--log-every", type=int, default=20, help="steps between progress updates")
    a("--out", default=None, help="run folder; if unset: runs/<method>-<dataset>, or the "
      "folder of the --resume checkpoint")
    a("--resume", metavar="PATH", default=None,
      help="continue the run saved in PATH (a checkpoint.pt) with its settings; flags given "
           "again override them, except the model, data and optimizer settings")
    a("--eval-only", action="store_true", help="with --resume: only evaluate the checkpoint")
    a = p.add_argument_group("other modes").add_argument
    a("--compare", nargs="+", metavar="DIR",
      help="overlay the runs in these folders into --out/compare.png and print a table")
    a("--benchmark", action="store_true",
      help="time full training steps against bare encoder steps; writes --out/benchmark.json")
    a("--bench-steps", type=int, default=10, help="timed steps per kind in --benchmark")
    a("--bench-warmup", type=int, default=3, help="untimed warm-up steps in --benchmark")
    return p


# Settings that define the model and its data: a resumed run may not change them.
FIXED_ON_RESUME = ("method", "arch", "feature_dim", "dataset", "image_size", "train_subset",
                   "group_size", "batch_size", "seed", "optimizer", "lr", "weight_decay")


def configure(args, given):
    """Merge a resumed checkpoint's settings with the flags `given` on the command line,
    then validate."""
    ckpt = None
    if args.eval_only and not args.resume:
        raise CareError("--eval-only needs --resume PATH (the checkpoint to evaluate)")
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        for k, v in ckpt["config"].items():
            flag = "--" + k.replace("_", "-")
            if k in FIXED_ON_RESUME and k in given and getattr(args, k) != v:
                raise CareError(f"--resume {args.resume} was trained with {flag} {v}, not "
                                f"{getattr(args, k)}: drop {flag} or start a new run")
            if k not in given and k not in ("resume", "eval_only", "out"):
                setattr(args, k, v)
        args.out = args.out or os.path.dirname(os.path.abspath(args.resume))
    if args.method == "simclr":
        args.lam = 0.0
    checks = [                                  # `not x > 0` also catches nan
        (args.group_size < 1, f"--group-size must be at least 1, got {args.group_size}"),
        (args.batch_size < 2, f"--batch-size must be at least 2, got {args.batch_size}"),
        ((args.method == "care" or args.benchmark) and args.group_size >= 1
         and args.batch_size % args.group_size,
         f"--batch-size {args.batch_size} is not a multiple of --group-size {args.group_size}"),
        (args.epochs < 0, f"--epochs must be >= 0, got {args.epochs}"),
        (not args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (not args.lam >= 0, f"--lam must be >= 0, got {args.lam}"),
        (not args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (not args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (args.feature_dim < 1, f"--feature-dim must be at least 1, got {args.feature_dim}"),
        (args.image_size < 4, f"--image-size must be at least 4, got {args.image_size}"),
        (args.train_subset < 0, f"--train-subset must be >= 0, got {args.train_subset}"),
        (min(args.knn_every, args.knn_k, args.log_every, args.bench_steps) < 1,
         "--knn-every, --knn-k, --log-every and --bench-steps must be at least 1"),
        (args.probe_epochs < 0 or args.warmup_epochs < 0,
         "--probe-epochs and --warmup-epochs must be >= 0"),
        (args.dataset == "folder" and not args.benchmark and not os.path.isdir(args.data_root),
         f"--data-root {args.data_root} does not exist (--dataset folder needs DIR/train/<class>/ "
         f"and DIR/test/<class>/)"),
    ]
    for failed, message in checks:
        if failed:
            raise CareError(message)
    args.data_root = os.path.abspath(args.data_root)      # the record works from anywhere
    args.out = args.out or os.path.join("runs", "benchmark" if args.benchmark
                                        else f"{args.method}-{args.dataset}")
    existing = os.path.join(args.out, "checkpoint.pt")
    continuing = args.resume and os.path.exists(existing) and os.path.samefile(existing, args.resume)
    if os.path.exists(existing) and not args.benchmark and not continuing:
        raise CareError(f"{args.out} already holds a run: continue it with --resume "
                        f"{os.path.join(args.out, 'checkpoint.pt')}, or choose another --out")
    pick_device(args.device)
    return args, ckpt


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CareError("--device cuda, but CUDA is not available here (no GPU, or a CPU-only "
                        "torch build); use --device cpu")
    return torch.device(name)


def parse_command_line(argv=None):
    """The parsed flags, and the set of those typed (not defaulted) on the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:              # parse again without any defaults
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def main(argv=None):
    args, given = parse_command_line(argv)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM = Ctrl-C
    try:
        if args.compare:
            return compare(args.compare, args.out or os.path.join("runs", "compare"))
        cfg, ckpt = configure(args, given)
        return benchmark(cfg) if cfg.benchmark else run(cfg, ckpt)
    except CareError as e:
        print(f"care.py: error: {e}", file=sys.stderr)
        raise SystemExit(e.code)
    except torch.cuda.OutOfMemoryError:
        print("care.py: error: out of GPU memory: lower --batch-size or --image-size, or use "
              "a smaller --arch", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:                   # outside the training loop: nothing to keep
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
