"""CARE: Contrastive Augmentation-induced Rotational Equivariance, in one file.

Gupta, Robinson, Lim, Villar, Jegelka, "Structuring Representation Geometry with
Rotationally Equivariant Contrastive Learning", ICLR 2024 (arXiv 2306.13924).

SimCLR asks two augmented views of an image to land on the same point of the unit
sphere, which teaches the encoder to *forget* the augmentation. CARE keeps SimCLR's loss
and adds one term: when one pair of augmentations (a, a') is applied to a whole group of
images, the embeddings must move by a *rotation* of the sphere. The augmentation stays
visible in the embedding as structured, linear motion instead of being erased:

    L = info_nce(z(t x), z(t' x)) + lam * equivariance_loss(z(a x), z(a' x), group_size)

The file reads top to bottom in the paper's order. Each section's banner says whether it
is the method (read it beside the paper) or machinery (a student may skip it):
  1.  data, held whole as uint8 tensors on the device                      machinery
  1b. the two-view, group-shared augmentation, batched on the device        method
  2.  the encoder: a torchvision ResNet (CIFAR or ImageNet stem) and head   method
  3.  the losses: InfoNCE and the equivariance loss, with the derivation    method
  4.  training: one step, its views and its objective                       method
  4b. the run: epochs, checkpoints, progress, resume, torchrun              machinery
  5.  evaluation: kNN monitor and linear probe                              machinery
  5b. geometry diagnostics: the paper's claims, measured                    method
  6.  plots; 7. other modes (--compare, --augmentations, --benchmark);
  8.  the command line                                                      machinery
A trained encoder leaves with load_encoder(path) (README, "Use the trained encoder").

    python care.py --epochs 200                 # CIFAR-10, ResNet-18, the authors' recipe
    python care.py --help
"""
import argparse
import datetime
import functools
import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torchvision.ops import roi_align


# The public all-gather with gradient (InfoNCE needs it) is marked deprecated: hush that.
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)


class CareError(Exception):
    """A problem with the user's input or environment: reported as one line, no traceback."""

    def __init__(self, message, code=2):          # 2: usage error, 1: anything else
        super().__init__(message)
        self.code = code


# =====================================================================================
# 1. Data: each split held whole, as uint8 on the device          [machinery: a student may skip it]
# CIFAR-10's 50,000 training images are 150 MB as uint8: they fit on any GPU. Holding
# them there removes the data loader, its worker processes and the per-image PIL
# transforms; a batch is an index into a tensor and augmentation runs on the device.

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
    cls = getattr(torchvision.datasets, name.upper())       # CIFAR10, CIFAR100, STL10
    kw = {"split": "train+unlabeled" if train else "test"} if name == "stl10" else {"train": train}
    try:
        ds = cls(root, download=False, **kw)
    except RuntimeError:                        # not downloaded yet
        try:
            ds = cls(root, download=True, **kw)
        except Exception as e:
            raise CareError(
                f"could not download {name} into {root} ({_first_line(e)}). Offline? Get it on a "
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
    images = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)

    def decode(i):                              # once, at load time, on every core
        try:                                    # (PIL and resize release the GIL)
            images[i] = _square(TF.pil_to_tensor(ds.default_loader(samples[i][0])), size)
        except OSError as e:
            raise CareError(f"cannot decode {samples[i][0]}: {_first_line(e)}", code=1) from None
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(decode, range(len(samples))))
    labels = torch.tensor([c for _, c in samples], dtype=torch.long)
    return images, labels, class_to_idx


def channel_stats(x):
    """Per-channel mean and std of a uint8 image tensor, in [0, 1] units."""
    total = torch.zeros(2, 3, dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.double().div(255).transpose(0, 1).flatten(1)           # (3, pixels)
        total += torch.stack([c.sum(1), c.square().sum(1)])
    mean = total[0] / (x.numel() / 3)
    std = (total[1] / (x.numel() / 3) - mean.square()).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def load_data(dataset, root, image_size, train_subset=0, device="cpu"):
    """Load both splits, resize them once to image_size, and put them on `device`."""
    if dataset == "folder":                     # (validate() checked that root exists)
        train_x, train_y, class_to_idx = _load_folder(root, "train", image_size)
        test_x, test_y, _ = _load_folder(root, "test", image_size, class_to_idx)
        classes = list(class_to_idx)
    else:
        train_x, train_y, classes = _load_torchvision(dataset, root, train=True)
        test_x, test_y, _ = _load_torchvision(dataset, root, train=False)
        train_x, test_x = (torch.cat([_square(c, image_size) for c in x.split(4096)])
                           for x in (train_x, test_x))
    if train_subset:                            # one fixed random subset, whatever --seed
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
        train_x, train_y = train_x[keep[:train_subset]], train_y[keep[:train_subset]]
    mean, std = channel_stats(train_x)
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                classes, mean, std)


# -------------------------------------------------------------------------------------
# 1b. Augmentation: two views, parameters shared within a group                 [the method]
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


rgb_to_grayscale = TF.rgb_to_grayscale          # ITU-R 601-2 luma: (B, 3, H, W) -> (B, 1, H, W)


def _blend(x, y, factor):
    """factor * x + (1 - factor) * y, clipped to [0, 1]: torchvision's `_blend`."""
    return (factor * x + (1 - factor) * y).clamp(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):                 # towards its mean grey level (one per image)
    return _blend(x, rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):               # towards its own grayscale version
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


def gaussian_blur(x, sigma, kernel_size=3):
    """Gaussian blur with one sigma per image and reflect padding, as torchvision's."""
    B, C, H, W = x.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (t / sigma[:, None]).square())                 # (B, k)
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)            # a kernel per channel
    # The 2-D kernel is separable: blur down the columns, then along the rows, each pass one
    # grouped convolution in which every (image, channel) plane has its own 1-D kernel.
    p = F.pad(x, (r, r, r, r), mode="reflect").reshape(1, B * C, H + 2 * r, W + 2 * r)
    p = F.conv2d(p, w.view(B * C, 1, kernel_size, 1), groups=B * C)
    return F.conv2d(p, w.view(B * C, 1, 1, kernel_size), groups=B * C).view(B, C, H, W)


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


def augment(x, group_size, generator=None, mean=CIFAR10_MEAN, std=CIFAR10_STD,
            scale_min=0.08, blur_kernel=3, u=None):
    """Augment a float batch (B, 3, H, W) in [0, 1]; returns normalised views, same shape.

    Parameters are drawn once per group of `group_size` consecutive images and shared by
    the whole group: that gives the pairs (a x_1, ..., a x_n) the equivariance loss needs.
    group_size=1 gives ordinary per-image SimCLR views. Every call draws fresh parameters,
    unless `u` (B // group_size, 1, 31) gives them (the diagnostics' per-family pairs).
    """
    B, _, H, W = x.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} images is not a multiple of group_size={group_size}")
    # One row of 31 uniforms per group, repeated for each image of the group (this expand
    # is all there is to group sharing). Columns: 0-9 crop areas and 10-19 aspect ratios
    # (ten tries, as torchvision), 20-21 crop position, 22 flip, 23-26 jitter strengths,
    # 27 jitter on?, 28 grayscale?, 29 blur?, 30 blur sigma.
    dev = generator.device if generator is not None else x.device
    if u is None:
        u = torch.rand(B // group_size, 1, 31, device=dev, generator=generator)
    u = u.to(x.device).expand(-1, group_size, -1).reshape(B, 31)
    x = random_resized_crop(x, u[:, 0:10], u[:, 10:20], u[:, 20:22], scale=(scale_min, 1.0))
    x = torch.where(_per_image(u[:, 22] < 0.5), x.flip(3), x)
    # Colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8. Simplification: torchvision applies
    # the four ops in a random order per call; here the order is fixed (b, c, s, h).
    b, c, s = (_per_image(0.6 + 0.8 * u[:, i]) for i in (23, 24, 25))   # U(0.6, 1.4)
    hue = -0.1 + 0.2 * u[:, 26]                                         # U(-0.1, 0.1)
    jittered = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(x, b), c), s), hue)
    x = torch.where(_per_image(u[:, 27] < 0.8), jittered, x)
    x = torch.where(_per_image(u[:, 28] < 0.2), rgb_to_grayscale(x).expand_as(x), x)
    blurred = gaussian_blur(x, 0.1 + 1.9 * u[:, 30], blur_kernel)
    x = torch.where(_per_image(u[:, 29] < 0.5), blurred, x)
    return normalize(x, mean, std)


def augmenter(cfg, mean, std):
    """augment() with this run's data statistics, crop scale and blur kernel."""
    return functools.partial(augment, mean=mean, std=std, scale_min=cfg.crop_scale_min,
                             blur_kernel=cfg.blur_kernel)


# =====================================================================================
# 2. The encoder: backbone h (evaluation) and projection head g (losses)        [the method]
ARCHS = ("resnet18", "resnet34", "resnet50")


class Encoder(nn.Module):
    """x -> (h, z): backbone features h (for evaluation) and unit projection z (for losses).

    A torchvision ResNet. 32x32 images are too small for its ImageNet stem (a 7x7 stride-2
    conv and a max-pool shrink them 4x before the first block), so the CIFAR stem replaces
    conv1 by a 3x3 stride-1 conv and drops the max-pool; from 64 px up (STL-10 at 96 px,
    ImageNet at 224 px) the ImageNet stem stays. The classifier is dropped; h is the pooled
    feature (512-d for ResNet-18/34, 2048-d for ResNet-50).
    """

    def __init__(self, arch="resnet18", feature_dim=128, stem="cifar"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        if stem == "cifar":
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
# 3. The losses: InfoNCE, its two halves, the equivariance loss and why it works [the method]
def _similarities(z1, z2, temperature):
    """Logits s_ik / tau over the 2B views, the diagonal removed, and each view's partner."""
    z = torch.cat([z1, z2]).float()
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    return logits, torch.arange(n, device=z.device).roll(n // 2)        # p(i) = i + B mod 2B


def info_nce(z1, z2, temperature=0.5, anchors=slice(None)):
    """NT-Xent over the 2B views: each view must pick out its partner among the 2B - 1.

    For view i with positive p(i), l_i = -log softmax_k(s_ik / tau)[p(i)], k != i, with
    s_ik = <z_i, z_k>: cross-entropy over the similarity logits with the diagonal removed
    and target p(i). `anchors` picks the views i averaged over (all, or one process's share:
    see objective()); every view stays a candidate k.
    """
    logits, partner = _similarities(z1, z2, temperature)
    return F.cross_entropy(logits[anchors], partner[anchors])


# InfoNCE's two halves. Write s_i = s_{i,p(i)} / tau for the positive and
# N_i = sum_{k not in {i, p(i)}} exp(s_ik / tau) for the negatives only. Then
#     l_i = -s_i + log(exp(s_i) + N_i) = [-s_i] + [log N_i] + log(1 + exp(s_i) / N_i).
# alignment = mean_i(-s_i) pulls t x and t' x together: invariance.
# uniformity = mean_i log N_i pushes every other pair apart: the non-collapse term.
# So info_nce = alignment + uniformity + mean_i log(1 + exp(s_i) / N_i), a remainder that is
# positive and small while one positive weighs little against 2B - 2 negatives. Training
# `uniformity + lam * equivariance_loss` (--contrastive uniformity) drops invariance
# altogether: only the rotation structure and the spread remain.
def alignment_uniformity(z1, z2, temperature=0.5, anchors=slice(None)):
    """(alignment, uniformity), the two halves of info_nce, as the reference computes them."""
    logits, partner = _similarities(z1, z2, temperature)
    logits, partner = logits[anchors], partner[anchors, None]
    negatives = logits.scatter(1, partner, float("-inf"))
    return -logits.gather(1, partner).mean(), torch.logsumexp(negatives, 1).mean()


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
#     matrices 1. InfoNCE's denominator (uniformity, above) prevents that. Its numerator
#     (alignment) pulls t x and t' x together, i.e. asks the rotation to be *small*: CARE
#     sits between invariance (R = I, SimCLR) and free equivariance (--contrastive
#     uniformity, which the paper finds non-trivial but weaker).
#
# (4) lam trades the two off. lam = 0 is SimCLR: augmentations are erased. As lam grows
#     the encoder is pushed to keep augmentations (colour, crop) as rotations, which keeps
#     information SimCLR throws away; too large and the rotation term crowds out
#     alignment. The reference uses lam = 0.03 on CIFAR-10.
#
# (5) One pair (a, a') per group is what the derivation asks: each group is its own test
#     of "one augmentation moves these n images by one rotation". The authors' CIFAR code
#     draws one pair per *batch* (--pair-per batch): its sampling runs once per step, so
#     every image gets the same a and the same a'. Each view set has its own forward pass
#     (there too), so BatchNorm then normalises a batch that all carries a, and its batch
#     statistics can absorb the channel shift a causes in common: in training part of a
#     may never reach z (at test time, with running statistics, it does). In the README's
#     CPU study one pair per batch trains to a 15% lower equivariance loss but no lower
#     test Gram error. One pair per group keeps a mix of augmentations in every batch.
#
# The diagonal of G - G' is zero for unit vectors, so leaving it out changes nothing
# there; the scaling 2/n (twice the mean over rows) is the reference implementation's.
def equivariance_loss(z1, z2, group_size):
    """Mean over groups of (2/n) sum_{i != j} (G_ij - G'_ij)^2, n = group_size.

    Rows [k n, (k+1) n) of z1 and z2 are group k: the same images under a and under a'.
    The sum has n (n - 1) terms, so the loss, and with it lam's effective weight, grows
    about linearly with n: a recipe's lam goes with its group size.
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
# 4. Training: one step, its four views and its objective                      [the method]
TERMS = ("loss", "info_nce", "alignment", "uniformity", "equivariance")   # one row per step


def train_step(model, optimizer, scaler, images, cfg, generator, aug):
    """One step on a uint8 batch; returns the TERMS on the device.

    CARE makes four views per image, as the authors' CIFAR code does: two per-image views
    (t x, t' x) for InfoNCE and two group-shared views (a x, a' x) for the equivariance
    loss; SimCLR only the first two. Each view set has its own forward pass, as in their
    code, so BatchNorm's statistics are per view set: see (5) above, and README, Speed."""
    x = images.float().div_(255)
    views = [aug(x, 1, generator) for _ in range(2)]
    if cfg.method == "care":
        shared = cfg.group_size if cfg.pair_per == "group" else len(x)
        views += [aug(x, shared, generator) for _ in range(2)]
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    dtype = amp_dtype(cfg.precision, x.device)          # the encoder's; the losses stay fp32
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        z = [model(v.contiguous(memory_format=layout))[1] for v in views]
    terms = objective(z, cfg)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms[0]).backward()
    scaler.step(optimizer)
    scaler.update()
    return terms.detach()


def objective(z, cfg):
    """The TERMS from the views' projections, in float32: loss = contrastive + lam * equi.

    Under torchrun each of W processes holds b = B / W images of the global batch B.
    InfoNCE needs all 2B views as candidates, so every process gathers z from all, with
    gradient, and averages l_i over its own 2b anchors: L_r. The mean of the L_r is the
    one-process loss on the global batch. In backward the gather returns to each process
    the sum over r of dL_r / d(its own z), and DDP averages parameter gradients over the
    processes, so the update is (1/W) sum_r dL_r/dtheta: the one-process gradient. The
    equivariance loss needs no gather, since a group never straddles two processes.
    """
    z1, z2, anchors = z[0].float(), z[1].float(), slice(None)
    if dist.is_initialized():
        b, rank, world = len(z1), dist.get_rank(), dist.get_world_size()
        z1, z2 = (torch.cat(dist_nn.all_gather(t)) for t in (z1, z2))
        mine = torch.arange(rank * b, (rank + 1) * b, device=z1.device)
        anchors = torch.cat([mine, mine + world * b])            # rows of z1, then of z2
    nce = info_nce(z1, z2, cfg.temperature, anchors)
    alignment, uniformity = alignment_uniformity(z1, z2, cfg.temperature, anchors)
    equi = (equivariance_loss(z[2], z[3], cfg.group_size) if cfg.method == "care"
            else torch.zeros((), device=z1.device))
    loss = (nce if cfg.contrastive == "infonce" else uniformity) + cfg.lam * equi
    return torch.stack([loss, nce, alignment, uniformity, equi])


# =====================================================================================
# 4b. The run: epochs, checkpoints, progress, resume, torchrun  [machinery: a student may skip it]
# Speed settings (README, Speed): the encoder in a 16-bit float where the hardware has one
# natively (the losses stay float32), and channels_last, the layout fast convolutions want.
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def amp_dtype(precision, device):
    """--precision auto: bf16 where the hardware has it (CUDA compute capability 8+, CPUs
    with AVX512-BF16 or AMX), fp16 on older GPUs (T4, V100: slow bf16), else fp32."""
    if precision == "auto" and device.type == "cuda":
        precision = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    elif precision == "auto":
        native = (getattr(torch.cpu, f, lambda: False)()
                  for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        precision = "bf16" if any(native) else "fp32"
    return PRECISIONS[precision]


def grad_scaler(cfg, device):
    """fp16 needs its loss scaled against underflowing gradients; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type,
                                enabled=amp_dtype(cfg.precision, device) == torch.float16)


def make_optimizer(model, cfg, steps_per_epoch):
    """Adam (the authors' CIFAR recipe) or SGD, with a constant or warm-up + cosine
    learning rate (stepped every step, as their CIFAR code does)."""
    sgd = functools.partial(torch.optim.SGD, momentum=0.9)
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else sgd)(   # fused: no host sync
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,  # in fp16's loss scaling
        fused=next(model.parameters()).is_cuda or None)
    warm, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def lr_factor(step):
        if cfg.lr_schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def build_model(cfg, device):
    """The encoder, and what training calls: it wrapped in DDP (torchrun), compiled (--compile)."""
    model = Encoder(cfg.arch, cfg.feature_dim, cfg.stem).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if dist.is_initialized():                   # gradients averaged across processes
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    return model, torch.compile(net, dynamic=False) if cfg.compile else net


def random_stream(device, *key):
    """A generator seeded by a key such as (seed, epoch, rank). Seeding each epoch afresh
    makes a resumed run draw exactly what the uninterrupted run draws, with no random
    state to save, and a run resumed on another device never replays an earlier epoch."""
    return torch.Generator(device).manual_seed(hash(key) % 2**63)


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@dataclass
class RunState:
    """What the epoch loop, the checkpoint and the evaluation share."""
    model: nn.Module                # the encoder: evaluation, checkpoints, figures
    net: nn.Module                  # what training calls: the encoder, or its DDP/compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: Data
    aug: functools.partial          # augment() with this run's statistics
    metrics: dict                   # the record: metrics.json
    log: object                     # print(), and the same line into train.log
    clock: float = 0.0              # time.time() at the start of the whole run


def train_epoch(s, cfg, epoch):
    """One pass over the training images in a fresh random order; returns the epoch's row.

    Losses stay on the device, one row per step; the host reads them once per log
    interval, so the GPU never waits for Python in between. Under torchrun every process
    draws the same order and trains on its own slice of each global batch.
    """
    rank, world = rank_and_world()
    N, B, dev = len(s.data.train_x), cfg.batch_size, s.data.train_x.device
    b, steps = B // world, N // B                       # the last partial batch is dropped
    # The order is drawn on the CPU: a GPU's randperm depends on the GPU model for large N.
    order = torch.randperm(N, generator=random_stream("cpu", cfg.seed, epoch)).to(dev)
    generator = random_stream(dev, cfg.seed, epoch, rank)   # this process's augmentations
    losses = torch.zeros(steps, len(TERMS), device=dev)
    live, read, t0 = sys.stdout.isatty() and rank == 0, 0, time.time()
    last_line = t0
    for step in range(steps):
        first = step * B + rank * b                     # consecutive images: random groups
        losses[step] = train_step(s.net, s.optimizer, s.scaler,
                                  s.data.train_x[order[first:first + b]], cfg, generator, s.aug)
        s.scheduler.step()
        if (step + 1) % cfg.log_every and step + 1 < steps:
            continue
        seen = losses[read:step + 1]                    # a view: the record gets the means too
        if world > 1:                                   # every process stops, or none
            dist.all_reduce(seen)
            seen /= world
        seen = seen.cpu()                               # the one host sync per interval
        bad = (~torch.isfinite(seen)).any(1).nonzero()
        if len(bad):
            kept = (f"{cfg.out} keeps the checkpoint of epoch {epoch - 1}" if epoch > 1
                    else "no checkpoint had been written yet")
            raise CareError(f"non-finite loss at epoch {epoch} step {read + int(bad[0]) + 1}/"
                            f"{steps}: stopped; {kept}. Try a lower --lr", code=1)
        read, elapsed = step + 1, time.time() - t0
        eta = elapsed / read * (steps - read)
        line = (f"epoch {epoch}/{cfg.epochs} step {read}/{steps} loss {seen[-1, 0].item():.4f}"
                f" | {read * B / elapsed:.0f} img/s | eta epoch {_hms(eta)}, run "
                f"{_hms(eta + elapsed / read * steps * (cfg.epochs - epoch))}")
        if live:
            print("\r" + line.ljust(100), end="", flush=True)
        elif rank == 0 and time.time() - last_line > 30:    # in a log file: a line per 30 s
            print(line, flush=True)
            last_line = time.time()
    if live:
        print("\r" + " " * 100 + "\r", end="", flush=True)
    seconds, terms = time.time() - t0, dict(zip(TERMS, losses.mean(0).tolist()))
    if cfg.method != "care":
        terms["equivariance"] = None
    return {"epoch": epoch, **terms, "knn_top1": None, "images_per_s": steps * B / seconds,
            "seconds": seconds, "lr": s.scheduler.get_last_lr()[0]}


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


def load_checkpoint(path, what="--resume"):
    """A checkpoint.pt as plain tensors and Python values (weights_only: no pickled code)."""
    if not os.path.isfile(path):
        raise CareError(f"{what} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CareError(f"{what} {path}: cannot read it as a checkpoint "
                        f"({_first_line(e)[:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch", "metrics"} <= ckpt.keys():
        raise CareError(f"{what} {path}: not a care.py checkpoint")
    return ckpt


def load_encoder(path):
    """The trained encoder of a checkpoint, for your own code: an Encoder in eval mode on
    the CPU. encoder(x) gives (h, z) for images in [0, 1] normalised with encoder.mean
    and encoder.std (the run's channel statistics; None in checkpoints older than them);
    encoder.backbone alone is the torchvision ResNet, h = encoder.backbone(x)."""
    ckpt = load_checkpoint(path, "load_encoder:")
    c = ckpt["config"]
    encoder = Encoder(c["arch"], c["feature_dim"], c["stem"])
    encoder.load_state_dict(ckpt["model"])
    encoder.mean, encoder.std = (ckpt["metrics"].get(k) for k in ("data_mean", "data_std"))
    return encoder.eval()


def restore(ckpt, s):
    """Load weights, optimizer, scheduler and loss-scaler state (random streams: none kept)."""
    optimizer = s.optimizer
    try:
        s.model.load_state_dict(ckpt["model"])
        # The optimizer's kernel (fused on CUDA, not on a CPU) belongs to this machine;
        # load_state_dict would take it from the checkpoint's groups (a CPU run's on a GPU).
        for mine, saved in zip(optimizer.param_groups, ckpt["optimizer"]["param_groups"]):
            saved.update(fused=mine["fused"], foreach=mine["foreach"])
        optimizer.load_state_dict(ckpt["optimizer"])
        s.scheduler.load_state_dict(ckpt["scheduler"])
        s.scaler.load_state_dict(ckpt.get("scaler") or s.scaler.state_dict())
    except (RuntimeError, ValueError, KeyError) as e:
        raise CareError(f"--resume: the checkpoint does not fit this model "
                        f"({_first_line(e)[:160]})") from None
    # The optimizer's moments arrive in the checkpoint's memory layout; give them their
    # parameter's (channels_last), or Adam leaves its fast multi-tensor path.
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                state[k] = torch.empty_like(p).copy_(v)


def _first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]


def _hms(s):
    return f"{int(s) // 3600}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}"


def logger(path, speak=True):
    """print(), and append the same line to the run's log file (only process 0 speaks)."""
    def log(msg=""):
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log if speak else lambda msg="": None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":")[1].strip() for l in open("/proc/cpuinfo")
                    if l.startswith("model name")), cpu)
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


HEADER = ("epoch |    loss | info_nce | alignment | uniformity | equivariance | kNN top-1 | "
          "Gram err | colour |  img/s |    time")


def table_row(r):
    f = lambda key, spec, unit="": "-" if r.get(key) is None else format(r[key], spec) + unit
    return (f"{r['epoch']:>5} | {f('loss', '.4f'):>7} | {f('info_nce', '.4f'):>8} | "
            f"{f('alignment', '.4f'):>9} | {f('uniformity', '.4f'):>10} | "
            f"{f('equivariance', '.5f'):>12} | {f('knn_top1', '.2f', '%'):>9} | "
            f"{f('gram_error', '.4f'):>8} | {f('colour_probe_top1', '.1f', '%'):>6} | "
            f"{f('images_per_s', '.0f'):>6} | {f('seconds', '.1f', 's'):>7}")


def setup(cfg):
    """The device (one GPU per process under torchrun), the process group, the seed."""
    device = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(hours=2))   # process 0 evaluates
    torch.manual_seed(cfg.seed)                 # the initial weights: equal on every process
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # autotune convolutions for fixed shapes
        torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (--precision fp32, evaluation)
    return device


def run(cfg, ckpt=None):
    """Train (or with --eval-only just evaluate), recording everything under cfg.out."""
    device = setup(cfg)
    rank, world = rank_and_world()
    os.makedirs(cfg.out, exist_ok=True)
    log = logger(os.path.join(cfg.out, "train.log"), speak=rank == 0)
    precision = str(amp_dtype(cfg.precision, device)).removeprefix("torch.")
    log(f"care.py | {cfg.method} | {cfg.dataset} {cfg.image_size}px | {cfg.arch} | "
        f"{device_name(device)}{f' x {world} processes' if world > 1 else ''} | {precision}"
        f" | out: {cfg.out}")
    log(f"settings: {command_line(cfg)}")
    t, first = time.time(), int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world > 1 and not first:
        dist.barrier()                          # one process per node downloads, the rest wait
    data = load_data(cfg.dataset, cfg.data_root, cfg.image_size, cfg.train_subset, device)
    if world > 1 and first:
        dist.barrier()
    if len(data.train_x) < cfg.batch_size:
        raise CareError(f"the training split has {len(data.train_x)} images, fewer than "
                        f"--batch-size {cfg.batch_size}")
    log(f"data: {len(data.train_x)} train / {len(data.test_x)} test images, "
        f"{len(data.classes)} classes, loaded in {time.time() - t:.1f}s")
    model, net = build_model(cfg, device)
    optimizer, scheduler = make_optimizer(model, cfg, len(data.train_x) // cfg.batch_size)
    metrics = {"config": vars(cfg), "device": device_name(device), "world_size": world,
               "precision": precision, "data_mean": data.mean, "data_std": data.std,
               "wall_time_s": 0.0, "linear_top1": None, "epochs": []}
    s = RunState(model, net, optimizer, scheduler, grad_scaler(cfg, device), data,
                 augmenter(cfg, data.mean, data.std), metrics, log)
    if ckpt is not None:
        restore(ckpt, s)
        metrics["wall_time_s"] = ckpt["metrics"]["wall_time_s"]
        metrics["epochs"] = [r for r in ckpt["metrics"]["epochs"] if r["epoch"] <= ckpt["epoch"]]
        log(f"resumed from {cfg.resume} after epoch {ckpt['epoch']}")
    s.clock = time.time() - metrics["wall_time_s"]      # wall time of the whole run
    feats = None if cfg.eval_only else train(cfg, s)
    return evaluate_run(cfg, s, feats) if rank == 0 else None


def train(cfg, s):
    """The epoch loop: train, monitor, save; Ctrl-C keeps the last finished epoch."""
    rank, world = rank_and_world()
    model, metrics, log = s.model, s.metrics, s.log
    ckpt_path, metrics_path = (os.path.join(cfg.out, f) for f in ("checkpoint.pt", "metrics.json"))
    log("\n".join([HEADER, *map(table_row, metrics["epochs"])]))  # and, resuming, the rows so far
    start, feats = metrics["epochs"][-1]["epoch"] + 1 if metrics["epochs"] else 1, None
    if start == 1 and rank == 0:                        # epoch 0: the untrained encoder
        feats, measured = monitor(s, cfg)
        metrics["epochs"].append({"epoch": 0, **dict.fromkeys(TERMS), "images_per_s": None,
                                  "seconds": None, **measured})
        log(table_row(metrics["epochs"][0]))
    saved = epoch = start - 1
    try:
        for epoch in range(start, cfg.epochs + 1):
            row = train_epoch(s, cfg, epoch)
            if rank == 0:                               # the others wait at the barrier
                feats = None
                if epoch % cfg.knn_every == 0 or epoch == cfg.epochs:
                    feats, measured = monitor(s, cfg)
                    row.update(measured)
                metrics["epochs"].append(row)
                metrics["wall_time_s"] = time.time() - s.clock
                atomic_save({"model": model.state_dict(), "optimizer": s.optimizer.state_dict(),
                             "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
                             "epoch": epoch, "config": vars(cfg), "metrics": metrics}, ckpt_path)
                saved = epoch
                atomic_save(metrics, metrics_path)
                log(table_row(row))
            if world > 1:
                dist.barrier()
    except KeyboardInterrupt:                           # Ctrl-C or SIGTERM
        if sys.stdout.isatty() and rank == 0:
            print()                                     # end the live progress line
        metrics["epochs"] = [r for r in metrics["epochs"] if r["epoch"] <= saved]
        if saved >= 1 and rank == 0:
            atomic_save(metrics, metrics_path)          # in step with the checkpoint
        launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
        log(f"interrupted during epoch {epoch}: " + (
            f"{ckpt_path} and {metrics_path} hold epoch {saved}; continue with: "
            f"{launcher} care.py --resume {ckpt_path}" if saved >= 1
            else "no epoch had finished, nothing to resume"))
        raise SystemExit(130)
    return feats


def monitor(s, cfg):
    """An epoch's kNN top-1 and cheaper geometry (2 pairs, no per-family fit); and the features."""
    feats = features(s.model, s.data)
    return feats, {"knn_top1": knn_top1(*feats, k=cfg.knn_k),
                   **geometry_diagnostics(s.model, s.data, s.aug, n_pairs=2, full=False)}


def evaluate_run(cfg, s, feats):
    """Process 0, after training: linear probe(s) and geometry; the record and figures."""
    model, data, metrics, log = s.model, s.data, s.metrics, s.log
    feats = feats or features(model, data)
    t = time.time()
    metrics["linear_top1"] = linear_probe(*feats, epochs=cfg.probe_epochs, seed=cfg.seed)
    log(f"linear probe top-1: {metrics['linear_top1']:.2f}% "
        f"({cfg.probe_epochs} epochs on frozen features, {time.time() - t:.1f}s)")
    if cfg.linear_eval == "reference":
        t = time.time()
        metrics["linear_top1_reference"] = reference_linear_eval(model, data, s.aug, cfg, feats[2])
        log(f"reference linear evaluation top-1: {metrics['linear_top1_reference']:.2f}% "
            f"({cfg.probe_epochs} epochs on freshly augmented images, {time.time() - t:.1f}s)")
    metrics["diagnostics"] = d = geometry_diagnostics(model, data, s.aug)
    hue = lambda key: "  ".join(f"{k}: {v:.3f}" for k, v in d[key].items())
    log(f"geometry on {d['images']} test images x {d['pairs']} augmentation pairs: gram error "
        f"{d['gram_error']:.4f}, best rotation turns {d['rotation_angle_deg']:.1f} degrees\n"
        f"  residual share of z(a'x) given z(ax): identity {d['identity_residual']:.3f}, "
        f"rotation {d['procrustes_residual']:.3f}, linear {d['linear_residual']:.3f}\n"
        f"  hue cosine of h: {hue('hue_cosine')}\n  hue cosine of z: {hue('hue_cosine_z')}\n"
        f"  colour probe top-1 (chance {100 / HUE_TURNS:.0f}%): h {d['colour_probe_top1']:.2f}%, "
        f"z {d['colour_probe_top1_z']:.2f}%\n  one family at a time, rotation residual: "
        + ", ".join(f"{f} {v['procrustes_residual']:.3f}" for f, v in d["by_family"].items()))
    metrics["wall_time_s"] = time.time() - s.clock
    metrics_path = os.path.join(cfg.out, "metrics.json")
    atomic_save(metrics, metrics_path)
    method = cfg.method.upper()
    groups, title = [(method, [metrics])], f"{method} | {run_title(metrics)}"
    plot(groups, os.path.join(cfg.out, "curves.png"), ["alignment", "uniformity", "equivariance",
         "knn", "gram", "procrustes", "angle", "hue", "hue_z", "colour"], 5, title)
    plot(groups, os.path.join(cfg.out, "geometry.png"),
         ["residuals", "hue_shifts", "families", "gram_matrices"], 2, title)
    log(f"done in {_hms(metrics['wall_time_s'])}: {metrics_path}, curves.png, geometry.png")
    return metrics


# =====================================================================================
# 5. Evaluation (float32, process 0): kNN monitor, linear probe [machinery: a student may skip it]
@torch.no_grad()
def embed(model, images, transform, batch_size=None):
    """Backbone features h and projections z of uint8 images, each batch mapped to the encoder's
    input by `transform` (normalise, or augment). Default batch: the pixels of 1024 32x32 images."""
    batch_size = batch_size or max(16, 2**20 // images[0, 0].numel())
    was_training = model.training
    model.eval()
    hs, zs = zip(*(model(transform(c.float() / 255)) for c in images.split(batch_size)))
    model.train(was_training)
    return torch.cat(hs).float(), torch.cat(zs)


def labelled(data):
    """The training images that have a label (STL-10's unlabelled split has -1)."""
    keep = data.train_y >= 0                    # all of them: no copy of the whole split
    return (data.train_x, data.train_y) if keep.all() else (data.train_x[keep], data.train_y[keep])


def features(model, data):
    """(train_h, train_y, test_h, test_y) on the labelled images, for kNN and the probe."""
    train_x, train_y = labelled(data)
    clean = functools.partial(normalize, mean=data.mean, std=data.std)
    return (embed(model, train_x, clean)[0], train_y, embed(model, data.test_x, clean)[0],
            data.test_y)


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
    """The fast linear evaluation, test top-1 %: a linear layer (Adam, cosine schedule) on
    frozen un-augmented backbone features, extracted once, standardised by the training split."""
    mu, sd = train_h.mean(0), train_h.std(0) + 1e-6
    return fit_linear(lambda: (train_h - mu) / sd, train_y, (test_h - mu) / sd, test_y,
                      epochs, batch_size, lr, 0.0, seed, cosine=True)


def reference_linear_eval(model, data, aug, cfg, test_h):
    """--linear-eval reference, the authors' CIFAR protocol: a linear layer (Adam 1e-3, weight
    decay 1e-6, batch 512) on the frozen backbone applied to freshly augmented training
    images every epoch, tested on un-augmented ones. (Their backbone stays in train mode;
    here it is frozen in eval mode, BatchNorm included.)"""
    train_x, train_y = labelled(data)
    g = torch.Generator(train_x.device).manual_seed(cfg.seed)
    fresh = lambda: embed(model, train_x, lambda x: aug(x, 1, g))[0]
    return fit_linear(fresh, train_y, test_h, data.test_y, cfg.probe_epochs,
                      512, 1e-3, 1e-6, cfg.seed, cosine=False)


@torch.enable_grad()                            # also when called from a no_grad diagnostic
def fit_linear(epoch_features, train_y, test_h, test_y, epochs, batch_size, lr, weight_decay,
               seed, cosine):
    """Train a linear classifier with Adam on epoch_features() (called once per epoch).
    `seed` fixes its initial weights and batch order, and the global random stream is
    left alone: a probe run during training cannot change the training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Linear(test_h.shape[1], int(train_y.max()) + 1).to(test_h.device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_y) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))) if cosine else 1.0)
    g = torch.Generator(test_h.device).manual_seed(seed)
    for _ in range(epochs):
        x = epoch_features()
        for idx in torch.randperm(len(x), device=x.device, generator=g).split(batch_size):
            loss = F.cross_entropy(clf(x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100 * (clf(test_h).argmax(1) == test_y).float().mean().item()


# =====================================================================================
# 5b. Geometry diagnostics: the paper's claims, measured on held-out images   [the method]
# K fixed augmentation pairs (a, a'), each applied to the same N test images, give
# Z = z(a x) and Z' = z(a' x). CARE's loss says Z Z^T = Z' Z'^T, i.e. Z' = Z R^T for an
# orthogonal R. We measure how far that holds, against two reference maps: the identity
# (pure invariance, SimCLR's ideal) and an unconstrained linear map (the most a linear
# map can explain). Always: linear <= rotation <= identity. How far the best rotation
# turns (its angle) says whether the rotations are small, as alignment asks.
HUE_TURNS = 10                  # the colour probe turns hue by k/10 of a turn: chance 10%
# Columns of augment()'s uniforms by family, and the column that switches it on (on below
# the family's probability, so 0 is on and 1 is off; the crop has no switch).
FAMILIES = {"crop": (range(22), None), "flip": ((), 22), "colour jitter": (range(23, 27), 27),
            "grayscale": ((), 28), "blur": ((30,), 29)}


def family_pair(family, g):
    """Parameters of a pair (a, a') equal but for one family: a without it, a' with it at a
    fresh strength (two different crops for "crop")."""
    cols, switch = FAMILIES[family]
    u = torch.rand(1, 1, 31, device=g.device, generator=g)
    u2 = u.clone()
    u2[..., list(cols)] = torch.rand(1, 1, len(cols), device=g.device, generator=g)
    if switch is not None:
        u[..., switch], u2[..., switch] = 1.0, 0.0
    return u, u2


def residuals(Z, Z2):
    """Share of the variance of Z' left unexplained by Z itself, by the best rotation of Z
    (orthogonal Procrustes) and by the best linear map of Z (least squares); and the
    angle of that best rotation."""
    Z, Z2 = Z.double().cpu(), Z2.double().cpu()
    total = (Z2 - Z2.mean(0)).square().sum()
    U, _, Vh = torch.linalg.svd(Z.T @ Z2)          # Z^T Z' = U S V^T -> Q = U V^T
    maps = {"identity": torch.eye(Z.shape[1], dtype=Z.dtype), "procrustes": U @ Vh,
            "linear": torch.linalg.lstsq(Z, Z2).solution}
    out = {f"{k}_residual": ((Z @ M - Z2).square().sum() / total).item() for k, M in maps.items()}
    return {**out, "rotation_angle_deg": rotation_angle_deg(Z, maps["procrustes"])}


def rotation_angle_deg(Z, Q):
    """How far the rotation z -> z Q turns the embeddings Z (unit rows): the mean angle
    between z and z Q, in degrees. 0 for the identity; theta for a turn by theta in every
    plane. (Averaging the phases of Q's eigenvalues instead would count the directions no
    embedding uses, where the best rotation is arbitrary.)"""
    cos = (Z * (Z @ Q)).sum(1) / Z.norm(dim=1).square()
    return math.degrees(cos.clamp(-1, 1).acos().mean().item())


def gram_error(Z, Z2):
    """Mean squared off-diagonal difference of Z Z^T and Z' Z'^T: the equivariance loss
    of one group holding all of Z, which sums 2/n times over n (n - 1) pairs, per pair."""
    n = len(Z)
    return equivariance_loss(Z, Z2, group_size=n).item() / (2 * (n - 1))


def pair_fit(model, x, aug, g, n_pairs, family=None):
    """gram_error, the residuals and the angle, means over n_pairs pairs (a, a') each
    applied to all of x: drawn from the augmentation, or differing in one family only."""
    out = {}
    for _ in range(n_pairs):
        u = family_pair(family, g) if family else (None, None)
        Z, Z2 = (embed(model, x, lambda v: aug(v, len(v), g, u=p), len(x))[1] for p in u)
        for k, v in {"gram_error": gram_error(Z, Z2), **residuals(Z, Z2)}.items():
            out[k] = out.get(k, 0.0) + v / n_pairs
    return out


def colour_probe(by_turn, seed=0):
    """Can the hue turn be read from the embedding? by_turn[k] holds the embeddings of the
    images turned by k/K. A linear probe learns k on the first half of the images and is
    tested on the other half (unseen images): top-1 in percent, chance 100/K. A cosine
    says how far a turn moves an embedding; this says whether the turn stays readable."""
    half = len(by_turn[0]) // 2
    split = lambda part: (torch.cat([e[part] for e in by_turn]), torch.arange(
        len(by_turn), device=by_turn[0].device).repeat_interleave(len(by_turn[0][part])))
    return linear_probe(*split(slice(None, half)), *split(slice(half, None)), batch_size=64,
                        lr=1e-2, seed=seed)     # enough steps to converge on 2,560 samples


def colour_diagnostics(model, x, data, seed=0):
    """Colour on h (what evaluation reads) and on z (where the losses act): the cosine
    between the embeddings of x and of x with its hue turned by 0.1 ... 0.5 of a turn,
    and the colour probe over HUE_TURNS turns."""
    clean = functools.partial(normalize, mean=data.mean, std=data.std)
    turned = [embed(model, x, lambda v: clean(adjust_hue(v, k / HUE_TURNS) if k else v))
              for k in range(HUE_TURNS)]
    out = {}
    for suffix, i in (("", 0), ("_z", 1)):
        out["hue_cosine" + suffix] = {f"{k / HUE_TURNS:g}": F.cosine_similarity(
            turned[0][i], turned[k][i]).mean().item() for k in range(1, HUE_TURNS // 2 + 1)}
        out["colour_probe_top1" + suffix] = colour_probe([e[i] for e in turned], seed)
    return out


@torch.no_grad()
def geometry_diagnostics(model, data, aug, n_images=512, n_pairs=8, seed=0, full=True):
    """The rotation fit (pair_fit) and colour_diagnostics on n_images fixed test images;
    full: also the fit per augmentation family and the Gram matrices of one group of 16."""
    g = torch.Generator(data.test_x.device).manual_seed(seed)
    x = data.test_x[torch.randperm(len(data.test_x), device=g.device, generator=g)[:n_images]]
    out = {"images": len(x), "pairs": n_pairs, **pair_fit(model, x, aug, g, n_pairs),
           **colour_diagnostics(model, x, data, seed)}
    if full:
        out["by_family"] = {f: pair_fit(model, x, aug, g, n_pairs, f) for f in FAMILIES}
        Z, Z2 = (embed(model, x[:16], lambda v: aug(v, len(v), g))[1] for _ in range(2))
        out["gram_matrices"] = {k: [[round(v, 4) for v in row] for row in (M @ M.T).tolist()]
                                for k, M in (("G", Z), ("G_prime", Z2))}
    return out


# =====================================================================================
# 6. Plots (matplotlib) from the records in metrics.json         [machinery: a student may skip it]
def _stats(values):
    """(mean, standard deviation) of the numbers among values; (None, None) if none."""
    v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
    return (None, None) if not len(v) else (v.mean().item(), v.std().item() if len(v) > 1 else 0.0)


def _value(record, key):
    """record[key]; a tuple key reads nested records: ("hue_cosine", "0.5")."""
    for k in key if isinstance(key, tuple) else (key,):
        record = record.get(k) if isinstance(record, dict) else None
    return record


def _curve(ax, groups, keys, title):
    """Each key against the epoch (the first solid, the next dashed), a colour per group."""
    for g, (label, ms) in enumerate(groups):
        for key, style in zip(keys, ("-", "--", ":")):
            by_epoch = {}
            for r in (r for m in ms for r in m["epochs"] if _value(r, key) is not None):
                by_epoch.setdefault(r["epoch"], []).append(_value(r, key))
            epochs = sorted(by_epoch)
            mean, sd = zip(*(_stats(by_epoch[e]) for e in epochs)) if epochs else ((), ())
            ax.plot(epochs, mean, style, color=f"C{g}", marker="o" if len(epochs) < 30 else None,
                    ms=3, label=None if style != "-" else label if epochs else f"{label} (none)")
            if len(ms) > 1 and epochs:                  # the spread over seeds
                ax.fill_between(epochs, [a - b for a, b in zip(mean, sd)],
                                [a + b for a, b in zip(mean, sd)], color=f"C{g}", alpha=0.2)
    ax.set(title=title, xlabel="epoch")


def _bars(ax, groups, names, keys, title):
    """A bar per group and name; with two keys, keys[0] light and keys[1] (smaller) on top."""
    width = 0.8 / len(groups)
    for i, (label, ms) in enumerate(groups):
        for key, alpha in zip(keys, (0.35, 1.0)[2 - len(keys):]):
            v = [_stats([_value(m.get("diagnostics") or {}, key(n)) for m in ms]) for n in names]
            ax.bar([j + i * width for j in range(len(names))], [a or 0 for a, _ in v], width,
                   yerr=[b or 0 for _, b in v], color=f"C{i}", alpha=alpha,
                   label=label if alpha == 1 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
    ax.set(title=title, ylabel="unexplained share of variance")


def _hue_curve(ax, groups):
    for g, (_, ms) in enumerate(groups):
        for key, style in (("hue_cosine", "-"), ("hue_cosine_z", "--")):
            shifts = list(_value(ms[0], ("diagnostics", key)) or {})
            means = [_stats([_value(m, ("diagnostics", key, s)) for m in ms])[0] for s in shifts]
            ax.plot([float(s) for s in shifts], means, style, marker="o", color=f"C{g}")
    ax.set(title="Colour sensitivity: cos(e(x), e(hue-shifted x))\nsolid: e = h, dashed: e = z",
           xlabel="hue shift (fraction of a turn)", ylabel="mean cosine similarity")


def _gram_matrices(ax, groups):
    """G, G' and |G - G'| of one group of test images under one pair: is G = G'?"""
    d = (groups[0][1][0].get("diagnostics") or {}).get("gram_matrices")
    if not d:
        return ax.axis("off")
    G, G2 = torch.tensor(d["G"]), torch.tensor(d["G_prime"])
    n, gap, D = len(G), torch.full((len(G), 1), float("nan")), G - G2
    ax.imshow(torch.cat([G, gap, G2, gap, D.abs()], 1).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks([(n - 1) / 2, 1.5 * n, 2.5 * n + 1], ["G = Z Z^T", "G' = Z' Z'^T", "|G - G'|"])
    ax.set(yticks=[], title=f"{n} test images, Z = z(a x), Z' = z(a' x) (-1 blue, +1 red)\n"
           f"mean off-diagonal (G - G')^2: {(D.square().sum() / (n * (n - 1))).item():.4f}")


_curves = lambda title, *keys: functools.partial(_curve, keys=keys, title=title)
_residual = lambda k: lambda family: ("by_family", family, f"{k}_residual")
PANELS = {
    **{k: _curves(f"{k} (training)", k) for k in TERMS[1:]},
    "knn": _curves("kNN top-1 % on the test split", "knn_top1"),
    "gram": _curves("Gram error (test)", "gram_error"),
    "procrustes": _curves("unexplained share of z(a'x):\nrotation (solid), identity (dashed)",
                          "procrustes_residual", "identity_residual"),
    "angle": _curves("rotation (degrees)", "rotation_angle_deg"),
    **{f"hue{s}": _curves(f"hue cosine of {s[1:] or 'h'}: 0.1 turn (solid), 0.5 (dashed)",
                          (f"hue_cosine{s}", "0.1"), (f"hue_cosine{s}", "0.5"))
       for s in ("", "_z")},
    "colour": _curves(f"colour probe top-1 %: h (solid), z (dashed);\n"
                      f"chance {100 / HUE_TURNS:.0f}%", "colour_probe_top1", "colour_probe_top1_z"),
    "residuals": functools.partial(
        _bars, names=["identity", "procrustes", "linear"], keys=[lambda n: f"{n}_residual"],
        title="How well z(a x) predicts z(a' x):\nidentity, best rotation, best linear map"),
    "families": functools.partial(
        _bars, names=list(FAMILIES), keys=[_residual("identity"), _residual("procrustes")],
        title="a, a' differ in one family only: unexplained\nby identity (light), by a rotation "
              "(dark)"),
    "hue_shifts": _hue_curve, "gram_matrices": _gram_matrices}


def plot(groups, path, panels, cols, title):
    """Draw PANELS for groups = [(label, [metrics, ...]), ...], `cols` panels a row. Colours
    name the groups in every panel; the first panel's legend says which is which."""
    rows = math.ceil(len(panels) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        PANELS[name](ax, groups)
    axes.flat[0].legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def pyplot():
    import matplotlib                           # headless: no display needed
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def run_title(m):
    c = m["config"]
    subset = f" ({c['train_subset']} images)" if c["train_subset"] else ""
    return (f"{c['arch']} | {c['dataset']} {c['image_size']}px{subset} | {c['epochs']} epochs, "
            f"batch {c['batch_size']} | {m['device']}")


# =====================================================================================
# 7. Other modes: --compare, --augmentations, --benchmark       [machinery: a student may skip it]
def summary(m):
    """The numbers a reader compares between runs, from one metrics.json."""
    d = m.get("diagnostics") or {}
    knn = [r["knn_top1"] for r in m["epochs"] if r.get("knn_top1") is not None]
    return {"kNN %": knn[-1] if knn else None, "linear %": m.get("linear_top1"),
            "Gram err": d.get("gram_error"), "Procrustes": d.get("procrustes_residual"),
            "rot deg": d.get("rotation_angle_deg"), "hue h 0.5": _value(d, ("hue_cosine", "0.5")),
            "hue z 0.5": _value(d, ("hue_cosine_z", "0.5")),
            "colour h %": d.get("colour_probe_top1"), "wall min": m["wall_time_s"] / 60}


# Settings that tell runs apart in --compare (the seed does not: runs that differ only by
# seed are one group, reported as mean and spread).
VARIANT_KEYS = ("method", "contrastive", "lam", "pair_per", "group_size", "temperature", "arch",
                "dataset", "image_size", "train_subset", "epochs", "batch_size", "optimizer",
                "lr", "precision")


def group_summary(ms):
    return {k: "-" if mean is None else f"{mean:.4g}" + (f" +- {sd:.1g}" if len(ms) > 1 else "")
            for k, (mean, sd) in ((k, _stats([summary(m)[k] for m in ms])) for k in summary(ms[0]))}


def compare(dirs, out):
    """--compare: runs grouped by setting, seeds pooled: out/compare.png and a mean +- sd table."""
    runs = []
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "metrics.json")):
            raise CareError(f"--compare {d}: no metrics.json there")
        with open(os.path.join(d, "metrics.json")) as f:
            runs.append(json.load(f))
    varying = [k for k in VARIANT_KEYS[1:] if len({str(m["config"].get(k)) for m in runs}) > 1]
    groups = {}
    for m in runs:
        c = m["config"]
        label = c["method"] + "".join(f" {k.replace('_', '-')}={c.get(k)}" for k in varying
                                      if k != "lam" or c["method"] == "care")
        groups.setdefault(label, []).append(m)
    groups = list(groups.items())
    plot(groups, os.path.join(out, "compare.png"),
         ["knn", "info_nce", "alignment", "uniformity", "equivariance", "gram", "procrustes",
          "angle", "hue", "hue_z", "colour", "residuals", "families", "hue_shifts"], 5,
         f"{len(runs)} runs in {len(groups)} settings | {run_title(runs[0])}")
    width = max(len(label) for label, _ in groups) + 2
    print(f"{'run':<{width}}{'seeds':>5}" + "".join(f"{k:>18}" for k in summary(runs[0])))
    for label, ms in groups:
        print(f"{label:<{width}}{len(ms):>5}"
              + "".join(f"{v:>18}" for v in group_summary(ms).values()))
    print(f"figure: {os.path.join(out, 'compare.png')}")


def draw_augmentations(cfg):
    """--augmentations: x, t x, t' x (per-image views) and a x, a' x (group-shared views)
    for two groups of four test images, into --out/augmentations.png."""
    data = load_data(cfg.dataset, cfg.data_root, cfg.image_size)
    g = torch.Generator().manual_seed(cfg.seed)
    x = data.test_x[torch.randperm(len(data.test_x), generator=g)[:8]].float() / 255
    aug, S = augmenter(cfg, data.mean, data.std), cfg.image_size + 1      # S: tile pitch
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (data.mean, data.std))
    rows = {"x": x, **{name: aug(x, n, g) * std + mean          # un-normalised, to be seen
                       for name, n in (("t x", 1), ("t' x", 1), ("a x", 4), ("a' x", 4))}}
    gap = torch.ones(1, *x.shape[1:])                           # a white tile between groups
    tiles = torch.cat([torch.cat([v[:4], gap, v[4:]]) for v in rows.values()]).clamp(0, 1)
    fig, ax = pyplot().subplots(figsize=(9, 5.6))
    grid = torchvision.utils.make_grid(tiles, nrow=9, padding=1, pad_value=1)
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_xticks([2 * S, 7 * S], ["group 1", "group 2"])
    ax.set_yticks([(i + 0.5) * S for i in range(5)], list(rows), fontsize=11)
    ax.tick_params(length=0, labeltop=True, labelbottom=False)
    ax.spines[:].set_visible(False)
    fig.suptitle("t, t': drawn per image (InfoNCE)    a, a': drawn once per group of 4 "
                 "(equivariance loss)", fontsize=10)
    save_figure(fig, os.path.join(cfg.out, "augmentations.png"))
    print(f"figure: {os.path.join(cfg.out, 'augmentations.png')}")


def benchmark(cfg):
    """--benchmark: the training step timed against itself on ready-made views (bare: step /
    bare is what the batched augmentation adds) and with --precision fp32 --no-channels-last
    --no-compile (fp32: fp32 / step is what the speed settings buy here). README, Speed."""
    device = setup(cfg)
    B, S = cfg.batch_size, cfg.image_size
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, device=device)
    g = torch.Generator(device).manual_seed(cfg.seed)
    aug = augmenter(cfg, CIFAR10_MEAN, CIFAR10_STD)
    ready = aug(images.float() / 255, 1, g)

    def stepper(views=aug, **change):           # a fresh network, optimizer and loss scaler
        c = argparse.Namespace(**{**vars(cfg), **change})
        model, net = build_model(c, device)
        opt, scaler = make_optimizer(model, c, 1)[0], grad_scaler(c, device)
        return lambda: train_step(net, opt, scaler, images, c, g, views)

    kinds = {"care": stepper(method="care"), "simclr": stepper(method="simclr"),
             "bare": stepper(lambda x, n, generator: ready),
             "fp32": stepper(precision="fp32", channels_last=False, compile=False)}
    med = time_steps(kinds, device, cfg.bench_warmup, cfg.bench_steps)
    result = {**{f"{k}_step_s": t for k, t in med.items()},
              "overhead_ratio": med[cfg.method] / med["bare"],
              "care_simclr_ratio": med["care"] / med["simclr"],
              "speedup_vs_fp32": med["fp32"] / med[cfg.method],
              "images_per_s": B / med[cfg.method], "device": device_name(device),
              "precision": str(amp_dtype(cfg.precision, device)).removeprefix("torch."),
              "host_syncs": count_host_syncs(kinds["care"]) if device.type == "cuda" else None,
              "config": vars(cfg)}
    path = os.path.join(cfg.out, "benchmark.json")
    os.makedirs(cfg.out, exist_ok=True)
    atomic_save(result, path)
    times = " | ".join(f"{k} step {t * 1e3:.1f} ms" for k, t in med.items())
    syncs = f" | host syncs in a step: {result['host_syncs']}" if device.type == "cuda" else ""
    print(f"benchmark: {cfg.arch}, batch {B} x {S}px, {result['device']}, {result['precision']}, "
          f"{'channels_last' if cfg.channels_last else 'contiguous'}, "
          f"{'compiled' if cfg.compile else 'eager'}; median of {cfg.bench_steps} steps after "
          f"{cfg.bench_warmup} warm-up\n  {times}\n  overhead ratio {result['overhead_ratio']:.3f}"
          f" | CARE / SimCLR step {result['care_simclr_ratio']:.2f} | speedup vs fp32 "
          f"{result['speedup_vs_fp32']:.2f} | {result['images_per_s']:.0f} images/s{syncs}"
          f" -> {path}")
    return result


def time_steps(kinds, device, warmup, steps):
    """Median seconds per step of each kind, the kinds interleaved: equal conditions."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in kinds}
    for i in range(warmup + steps):
        for kind, step in kinds.items():
            sync()
            t = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[kind].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def count_host_syncs(step):
    """Run one step with CUDA's sync debug mode on; count the host syncs it reports."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in seen)


# =====================================================================================
# 8. Command line: flags, recipes by dataset, checks, errors    [machinery: a student may skip it]
# The reference recipe of each dataset (the authors' scripts; ../shared/METHOD.md). A flag
# the user does not type takes its dataset's value; typed flags win.
CIFAR_RECIPE = dict(lam=0.03, group_size=16, optimizer="adam", lr=1e-3, weight_decay=1e-6,
                    lr_schedule="constant")
RECIPES = {"cifar10": CIFAR_RECIPE, "cifar100": dict(CIFAR_RECIPE, lam=0.001, group_size=64),
           "stl10": dict(lam=0.01, group_size=32, optimizer="sgd", lr=0.06, weight_decay=5e-4,
                         lr_schedule="cosine"),
           "folder": CIFAR_RECIPE}
# The settings that define a training run: the header prints them as flags, and a resumed
# run may not change the first group (the model, its data and its optimizer).
FIXED_ON_RESUME = ("method", "contrastive", "arch", "stem", "feature_dim", "dataset",
                   "image_size", "train_subset", "group_size", "pair_per", "batch_size", "seed",
                   "optimizer", "lr", "weight_decay", "crop_scale_min", "blur_kernel")
RUN_SETTINGS = FIXED_ON_RESUME + ("lam", "temperature", "epochs", "lr_schedule",
                                  "warmup_epochs", "precision")
# Settings of the machine, not of the run: a resumed run takes them from its own flags.
MACHINE_SETTINGS = ("device", "precision", "channels_last", "compile", "sync_bn")


def command_line(cfg):
    """The flags that repeat this run's training."""
    flag = lambda k, v: f"--{k.replace('_', '-')} {format(v, 'g') if isinstance(v, float) else v}"
    return " ".join(flag(k, getattr(cfg, k)) for k in RUN_SETTINGS
                    if k != "warmup_epochs" or cfg.lr_schedule == "cosine")


class Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line, no usage block
        self.exit(2, f"care.py: error: {message} (see python care.py --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):         # recipe flags: no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    recipes = "\n".join(f"  {name:<9}" + " ".join(f"--{k.replace('_', '-')} {v}"
                                                  for k, v in r.items())
                        for name, r in RECIPES.items())
    p = Parser(description="CARE / SimCLR self-supervised training, evaluation and figures "
               "in one file. Several processes: torchrun --nproc_per_node=N care.py ...",
               formatter_class=HelpFormatter,
               epilog=f"defaults that depend on --dataset (its reference recipe):\n{recipes}")
    by_dataset = " (default: by --dataset, below)"
    on_off = argparse.BooleanOptionalAction          # --flag / --no-flag
    a = p.add_argument_group("method").add_argument
    a("--method", choices=["care", "simclr"], default="care",
      help="care: contrastive + lam * equivariance loss; simclr: contrastive only (lam = 0)")
    a("--contrastive", choices=["infonce", "uniformity"], default="infonce",
      help="InfoNCE, or only its uniformity half (no invariance)")
    a("--lam", type=float, help="weight of the equivariance loss" + by_dataset)
    a("--group-size", type=int, help="images per Gram matrix, sharing a pair (a, a')" + by_dataset)
    a("--pair-per", choices=["group", "batch"], default="group",
      help="draw (a, a') per group, or per batch (the authors' code; per process)")
    a("--temperature", type=float, default=0.5, help="InfoNCE temperature tau")
    a("--arch", choices=ARCHS, default="resnet18", help="backbone")
    a("--stem", choices=["auto", "cifar", "imagenet"], default="auto", help="auto: cifar < 64 px")
    a("--feature-dim", type=int, default=128, help="dimension of the projection z")
    a = p.add_argument_group("data").add_argument
    a("--dataset", choices=[*RECIPES], default="cifar10", help="a torchvision dataset, or a folder")
    a("--data-root", default="./data", help="download folder, or DIR/{train,test}/<class>/")
    a("--image-size", type=int, default=32, help="images are resized once, at load time")
    a("--train-subset", type=int, default=0, help="a fixed random subset of N images (0: all)")
    a("--crop-scale-min", type=float, default=0.08, help="smallest crop area, as a share")
    a("--blur-kernel", type=int, default=3, help="Gaussian blur kernel size (odd)")
    a = p.add_argument_group("optimisation").add_argument
    a("--epochs", type=int, default=200, help="0: evaluate the initial encoder")
    a("--batch-size", type=int, default=256, help="images per step, over all processes")
    a("--optimizer", choices=["adam", "sgd"], help="sgd uses momentum 0.9" + by_dataset)
    a("--lr", type=float, help="learning rate" + by_dataset)
    a("--weight-decay", type=float, help="weight decay" + by_dataset)
    a("--lr-schedule", choices=["constant", "cosine"], help="cosine: with warm-up" + by_dataset)
    a("--warmup-epochs", type=int, default=10, help="warm-up length for --lr-schedule cosine")
    a("--seed", type=int, default=0, help="seeds the model, data order and augmentation")
    a = p.add_argument_group("speed and devices (README, Speed)").add_argument
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    a("--precision", choices=["auto", *PRECISIONS], default="auto",
      help="of the encoder (losses stay fp32); auto: bf16 where native, fp16 on older GPUs")
    a("--channels-last", action=on_off, default=True, help="channels-innermost memory layout")
    a("--compile", action=on_off, default=False, help="torch.compile the encoder for training")
    a("--sync-bn", action=on_off, default=False,
      help="torchrun on GPUs: BatchNorm over the global batch (SyncBatchNorm: ~3 host syncs "
           "per layer and forward)")
    a = p.add_argument_group("evaluation and output").add_argument
    a("--knn-every", type=int, default=10, help="kNN monitor every N epochs (and at the end)")
    a("--knn-k", type=int, default=200, help="neighbours in the weighted kNN")
    a("--probe-epochs", type=int, default=100, help="epochs of the final linear evaluation")
    a("--linear-eval", choices=["fast", "reference"], default="fast",
      help="reference: also the authors' protocol (freshly augmented images every epoch)")
    a("--log-every", type=int, default=20, help="steps between progress updates")
    a("--out", help="run folder (default: runs/<method>-<dataset>, or the --resume folder)")
    a("--resume", metavar="PATH", help="continue this checkpoint.pt with its settings "
      "(flags typed again win, except model, data and optimizer)")
    a("--eval-only", action="store_true", help="with --resume: only evaluate the checkpoint")
    a = p.add_argument_group("other modes").add_argument
    a("--compare", nargs="+", metavar="DIR", help="pool runs by setting: --out/compare.png")
    a("--benchmark", action="store_true", help="time training steps: --out/benchmark.json")
    a("--bench-steps", type=int, default=10, help="timed steps per kind in --benchmark")
    a("--bench-warmup", type=int, default=3, help="untimed warm-up steps in --benchmark")
    a("--augmentations", action="store_true", help="draw the views: --out/augmentations.png")
    return p


def configure(args, given):
    """Settings: typed flags, else the resumed checkpoint's, else the dataset recipe; validated."""
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
            if k not in given and k not in ("resume", "eval_only", "out") + MACHINE_SETTINGS:
                setattr(args, k, v)
        args.out = args.out or os.path.dirname(os.path.abspath(args.resume))
        if args.lr_schedule == "cosine" and args.epochs != ckpt["config"]["epochs"]:
            raise CareError(f"--epochs {args.epochs}: this run's cosine schedule ends at epoch "
                            f"{ckpt['config']['epochs']}, and another length would make the "
                            f"learning rate jump; start a new run instead")
    for k, v in RECIPES[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.method == "simclr":
        args.lam = 0.0
    if args.stem == "auto":
        args.stem = "cifar" if args.image_size < 64 else "imagenet"
    validate(args)
    args.data_root = os.path.abspath(args.data_root)      # the record works from anywhere
    args.out = args.out or os.path.join("runs", "benchmark" if args.benchmark
                                        else f"{args.method}-{args.dataset}")
    existing = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(existing) and not args.benchmark and not (
            args.resume and os.path.samefile(existing, args.resume)):
        raise CareError(f"{args.out} already holds a run: continue it with --resume {existing}, "
                        f"or choose another --out")
    return args, ckpt


def validate(args):
    """Every check that needs no data: a bad flag fails here, before any work is done."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    b, device = args.batch_size // world, pick_device(args.device)  # b: one process's share
    minima = dict(group_size=1, batch_size=2, epochs=0, feature_dim=1, image_size=4, train_subset=0,
                  knn_every=1, knn_k=1, log_every=1, bench_steps=1, probe_epochs=0, warmup_epochs=0)
    checks = [(getattr(args, k) < m, f"--{k.replace('_', '-')} must be "
               f"{f'at least {m}' if m else '>= 0'}, got {getattr(args, k)}")
              for k, m in minima.items()]
    checks += [                                 # `not x > 0` also catches nan
        (args.batch_size % world, f"--batch-size {args.batch_size} is not divisible by the "
                                  f"{world} processes"),
        (b < 2, f"--batch-size {args.batch_size} leaves {b} image per process; BatchNorm "
                f"needs at least 2"),
        ((args.method == "care" or args.benchmark) and args.group_size >= 1 and b % args.group_size,
         f"--batch-size {args.batch_size} is not a multiple of --group-size {args.group_size}"
         + (f" on each of {world} processes ({b} images each)" if world > 1 else "")),
        (not args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (not args.lam >= 0, f"--lam must be >= 0, got {args.lam}"),
        (not args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (not args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (not 0 < args.crop_scale_min <= 1, f"--crop-scale-min must be in (0, 1], got "
                                          f"{args.crop_scale_min}"),
        (args.blur_kernel % 2 == 0 or not 1 <= args.blur_kernel < 2 * args.image_size,
         f"--blur-kernel must be odd and smaller than twice --image-size, got {args.blur_kernel}"),
        (args.dataset == "folder" and not args.benchmark and not os.path.isdir(args.data_root),
         f"--data-root {args.data_root} does not exist (--dataset folder needs DIR/train/<class>/ "
         f"and DIR/test/<class>/)"),
        (world > 1 and (args.benchmark or args.augmentations),
         "--benchmark and --augmentations run in one process: start them with python, "
         "not torchrun"),
        (args.sync_bn and device.type != "cuda",
         "--sync-bn needs CUDA (SyncBatchNorm has no CPU version); drop it on the CPU"),
        (device.type == "cuda" and torch.cuda.device_count() < local,
         f"{local} processes on this node but {torch.cuda.device_count()} GPUs: start at "
         f"most one process per GPU"),
    ]
    for failed, message in checks:
        if failed:
            raise CareError(message)


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


def _out_of_memory(e):
    """An out-of-memory error, also when torch.compile wraps it in its own exception."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "inner_exception", None)
    return False


def main(argv=None):
    args, given = parse_command_line(argv)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM = Ctrl-C
    speak = os.environ.get("RANK", "0") == "0"  # under torchrun only process 0 reports
    try:
        if args.compare:
            return compare(args.compare, args.out or os.path.join("runs", "compare"))
        cfg, ckpt = configure(args, given)
        if cfg.augmentations:
            return draw_augmentations(cfg)
        return benchmark(cfg) if cfg.benchmark else run(cfg, ckpt)
    except KeyboardInterrupt:                   # outside the training loop: nothing to keep
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)
    except Exception as e:
        if not isinstance(e, CareError):
            if not _out_of_memory(e):
                raise
            e = CareError("out of GPU memory: lower --batch-size or --image-size, or use a "
                          "smaller --arch", code=1)
        if speak:
            print(f"care.py: error: {e}", file=sys.stderr)
        raise SystemExit(e.code)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
