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
  1. data and the two-view, group-shared augmentation   (all on the device, batched)
  2. the encoder: a CIFAR-stem ResNet and the projection head
  3. the losses: InfoNCE and the orthogonal equivariance loss, with the derivation
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_align

# =====================================================================================
# 1. Data augmentation: two views, parameters shared within a group
# =====================================================================================
# The reference CIFAR recipe (SimCLR's): random resized crop, horizontal flip, colour
# jitter with p=0.8, grayscale with p=0.2, Gaussian blur with p=0.5, normalisation.
# torchvision's transforms work on one image at a time with Python-side randomness; here
# every parameter is a tensor with one entry per image, so a whole batch is augmented by a
# handful of kernels on the device. The colour ops below follow the formulas of
# torchvision.transforms.functional (test_care.py checks each against it); torchvision
# lacks only the per-image *tensor* of factors, which is why they are written out here.

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


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
    shift = torch.as_tensor(shift, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    h = (h / 6 + shift) % 1.0                     # the hue rotation itself
    s = c / torch.where(v > 0, v, 1.0)
    # HSV -> RGB in closed form: channel_n = v - v s clamp(min(k, 4 - k), 0, 1) with
    # k = (n + 6h) mod 6 and n = 5, 3, 1 for R, G, B (the piecewise formula, vectorised).
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = (n + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x, sigma):
    """3x3 Gaussian blur with one sigma per image, reflect padding (as torchvision)."""
    taps = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    w = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    w = w / w.sum(1, keepdim=True)                               # (B, 3): one kernel each
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
    lo, hi = torch.log(torch.tensor(ratio, device=x.device))
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
    u = torch.rand(B // group_size, 31, device=dev, generator=generator).to(x.device)
    u = u.repeat_interleave(group_size, 0)
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
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


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
