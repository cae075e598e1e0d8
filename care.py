"""CARE: Contrastive Augmentation-induced Rotational Equivariance, in one file.

Gupta, Robinson, Lim, Villar, Jegelka, "Structuring Representation Geometry with
Rotationally Equivariant Contrastive Learning", ICLR 2024 (arXiv 2306.13924).

SimCLR asks two augmented views of an image to land on the same point of the unit
sphere, which teaches the encoder to *forget* the augmentation. CARE keeps SimCLR's loss
and adds one term: when one pair of augmentations (a, a') is applied to a whole group of
images, the embeddings must move by a *rotation* of the sphere. The augmentation stays
visible in the embedding as structured, linear motion instead of being erased:

    L = info_nce(z(t x), z(t' x)) + lam * equivariance_loss(z(a x), z(a' x), group_size)

Here z is the encoder's unit embedding, t and t' are two augmentations drawn for each image
(SimCLR's two views), and a and a' are two augmentations drawn once for each group of
group_size images and shared by all of them.

Part I, the method, reads top to bottom beside the paper and is the code that trains:
1. the group-shared augmentation, 2. the encoder, 3. InfoNCE and the equivariance loss
with the derivation, 4. the training step, 5. the epoch loop, 6. kNN and the linear probe.
It ends at line 428, the banner "Part II, the machinery"; the machinery follows.
Part II holds what a student may skip: settings, data, the batched image operations,
precision and torchrun, checkpoints, progress, evaluation and the geometry diagnostics,
plots, other modes (--compare, --augmentations, --benchmark, --exercise), the command line.

    python care.py --epochs 200                 # CIFAR-10, ResNet-18, the authors' recipe
    python care.py --help
"""
import argparse
import ast
import datetime
import functools
import itertools
import json
import math
import os
import platform
import shutil
import shlex
import signal
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torchvision.ops import roi_align

# =====================================================================================
# Part I, the method: read it beside the paper. It is the code that trains.
# =====================================================================================

# -------------------------------------------------------------------------------------
# 1. Two kinds of views: t, t' drawn per image, a, a' drawn once per group
# The CIFAR recipe: SimCLR's CIFAR augmentations (random resized crop, horizontal flip,
# colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2), then the Gaussian
# blur (kernel 3, p=0.5) that the CARE authors' CIFAR pipeline adds (SimCLR blurs only its
# ImageNet views), then normalisation. Each random choice is a uniform number in [0, 1),
# so one draw of the whole recipe is a row of uniforms in named columns; augment() applies
# a batch of rows at once, on the device. The operations themselves (crop, colour, blur)
# mirror torchvision's; they sit with the machinery below.
# Columns per name: ten tries of crop area and aspect (as torchvision), the crop's place,
# strengths, and a switch per family (flip, jitter, grayscale, blur): on below its probability.
AUG_PARAMS = dict(crop_area=10, crop_aspect=10, crop_position=2, flip=1, jitter_strengths=4,
                  jitter=1, grayscale=1, blur=1, blur_sigma=1)
AUG_COLUMNS = {name: slice(end - n, end) for (name, n), end in
               zip(AUG_PARAMS.items(), itertools.accumulate(AUG_PARAMS.values()))}
N_UNIFORMS = sum(AUG_PARAMS.values())               # 31
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

def augment(x, group_size, generator=None, mean=CIFAR10_MEAN, std=CIFAR10_STD,
            scale_min=0.08, blur_kernel=3, u=None):
    """Augment a float batch (B, 3, H, W) in [0, 1]: normalised views, same shape, dtype
    and device.

    Parameters are drawn once per group of `group_size` consecutive images and shared by
    the whole group: that gives the pairs (a x_1, ..., a x_n) the equivariance loss needs.
    group_size=1 gives ordinary per-image SimCLR views. Every call draws fresh parameters
    (torch.rand with `generator`), unless `u` (B // group_size, 1, N_UNIFORMS) gives them,
    row k to group k. A row's columns (AUG_COLUMNS) act in this order:
    random_resized_crop(crop_area, crop_aspect, crop_position, scale=(scale_min, 1)); a
    horizontal flip if flip < 0.5; if jitter < 0.8, brightness, contrast and saturation
    factors 0.6 + 0.8 u and a hue shift -0.1 + 0.2 u (jitter_strengths, applied in that
    order); grayscale if grayscale < 0.2; gaussian_blur(kernel blur_kernel, sigma 0.1 +
    1.9 blur_sigma) if blur < 0.5; normalize(mean, std). A ValueError if group_size < 1
    or B is not a multiple of it.
    """
    B = len(x)
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} images is not a multiple of group_size={group_size}")
    if u is None:
        dev = generator.device if generator is not None else x.device
        u = torch.rand(B // group_size, 1, N_UNIFORMS, device=dev, generator=generator)
    # Group sharing is this one line: each group's row, repeated for each of its images.
    u = u.to(x.device).expand(-1, group_size, -1).reshape(B, N_UNIFORMS)
    p = {name: u[:, columns] for name, columns in AUG_COLUMNS.items()}
    x = random_resized_crop(x, p["crop_area"], p["crop_aspect"], p["crop_position"],
                            scale=(scale_min, 1.0))
    x = torch.where(_per_image(p["flip"] < 0.5), x.flip(3), x)
    # Colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8. Simplification: torchvision applies
    # the four ops in a random order per call; here the order is fixed.
    bright, contrast, saturation, hue = p["jitter_strengths"].unbind(1)
    jittered = adjust_brightness(x, _per_image(0.6 + 0.8 * bright))         # U(0.6, 1.4)
    jittered = adjust_contrast(jittered, _per_image(0.6 + 0.8 * contrast))
    jittered = adjust_saturation(jittered, _per_image(0.6 + 0.8 * saturation))
    jittered = adjust_hue(jittered, -0.1 + 0.2 * hue)                       # U(-0.1, 0.1)
    x = torch.where(_per_image(p["jitter"] < 0.8), jittered, x)
    x = torch.where(_per_image(p["grayscale"] < 0.2), rgb_to_grayscale(x).expand_as(x), x)
    blurred = gaussian_blur(x, 0.1 + 1.9 * p["blur_sigma"][:, 0], blur_kernel)
    x = torch.where(_per_image(p["blur"] < 0.5), blurred, x)
    return normalize(x, mean, std)

# -------------------------------------------------------------------------------------
# 2. The encoder: the backbone, whose output h is evaluated, and the projection head,
# whose unit output z the losses act on
ARCHS = ("resnet18", "resnet34", "resnet50")

class Encoder(nn.Module):
    """x -> (h, z): h = backbone(x) (for evaluation), z = head(h) / |head(h)| (for losses).

    The backbone is a torchvision ResNet. 32x32 images are too small for its ImageNet stem
    (a 7x7 stride-2 conv and a max-pool shrink them 4x before the first block), so below
    64 px the CIFAR stem replaces conv1 by a 3x3 stride-1 conv and drops the max-pool (the
    cifar10, cifar100 and stl10 recipes, all at 32 px); from 64 px up (imagenet100 at 224
    px) the ImageNet stem stays. The classifier is dropped; h is the pooled feature (512-d
    for ResNet-18/34, 2048-d for ResNet-50).
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

def stem_for(image_size):
    return "cifar" if image_size < 64 else "imagenet"

# -------------------------------------------------------------------------------------
# 3. The losses: InfoNCE, its two halves, the equivariance loss and why it works
def similarity_logits(z1, z2, temperature):
    """Logits s_ik / tau over the 2B views z = [z1; z2], in float32 whatever the views'
    dtype: (2B, 2B), the diagonal -inf (a view is no candidate of its own); and each view's
    partner p(i) = (i + B) mod 2B, a (2B,) index tensor: z1[i], z2[i] are views of image i."""
    z = torch.cat([z1, z2]).float()
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    return logits, torch.arange(n, device=z.device).roll(n // 2)        # p(i) = i + B mod 2B

def info_nce(z1, z2, temperature=0.5):
    """NT-Xent over the 2B views: each view must pick out its partner among the 2B - 1.

    For view i with positive p(i), l_i = -log softmax_k(s_ik / tau)[p(i)], k != i, with
    s_ik = <z_i, z_k>: cross-entropy over the similarity logits with the diagonal removed
    and target p(i), averaged over the 2B views. A 0-d float32 tensor with gradient, exact
    at small temperatures too: at tau = 0.01 a logit is up to 100 and exp(100) overflows
    float32, so the softmax must be taken in log-sum-exp form (as cross_entropy does).
    """
    logits, partner = similarity_logits(z1, z2, temperature)
    return F.cross_entropy(logits, partner)

# InfoNCE's two halves. Write s_i = s_{i,p(i)} / tau for the positive and
# N_i = sum_{k not in {i, p(i)}} exp(s_ik / tau) for the negatives only. Then
#     l_i = -s_i + log(exp(s_i) + N_i) = [-s_i] + [log N_i] + log(1 + exp(s_i) / N_i).
# alignment = mean_i(-s_i) pulls t x and t' x together: invariance.
# uniformity = mean_i log N_i pushes every other pair apart: the non-collapse term.
# So info_nce = alignment + uniformity + mean_i log(1 + exp(s_i) / N_i), a remainder that is
# positive and small while one positive weighs little against 2B - 2 negatives.
# This alignment is -cos(z, z') / tau, so it is negative (-1/tau when the views agree).
# Wang & Isola's alignment, ||z - z'||^2 = 2 - 2 cos(z, z') for unit vectors, is the same
# quantity up to scale and shift: ours = (||z - z'||^2 / 2 - 1) / tau, averaged.
# Training uses info_nce itself; the two halves are recorded every epoch (the table's
# columns) and trained only with --contrastive uniformity, whose loss is
# `uniformity + lam * equivariance_loss`: invariance dropped altogether, only the rotation
# structure and the spread remain.
def alignment_uniformity(z1, z2, temperature=0.5):
    """(alignment, uniformity), the two halves of info_nce defined above: 0-d float32
    tensors with gradient, exact at small temperatures (log-sum-exp, as info_nce)."""
    logits, partner = similarity_logits(z1, z2, temperature)
    negatives = logits.scatter(1, partner[:, None], float("-inf"))
    return -logits.gather(1, partner[:, None]).mean(), torch.logsumexp(negatives, 1).mean()

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
#     G = G'. So the loss is zero iff each augmentation pair acts on the group as an
#     orthogonal map (the paper proves the population version). An orthogonal map may be
#     a reflection (det -1) as well as a rotation: here, as in the paper, "rotation"
#     means either.
#
# (3) Alone, this loss collapses: a constant encoder makes every entry of both Gram
#     matrices 1. InfoNCE's denominator (uniformity, above) prevents that. Its numerator
#     (alignment) pulls t x and t' x together, i.e. asks the rotation to be *small*: CARE
#     sits between invariance (R = I, SimCLR) and free equivariance (--contrastive
#     uniformity, which the paper finds non-trivial but weaker).
#
# (4) What lam trades off. The loss is zero for every orthogonal map, the identity
#     included: an invariant encoder (z(a x) = z(a' x), SimCLR's ideal) pays nothing. So
#     the term cannot reward keeping information about an augmentation, and it never
#     opposes alignment, whose optimum (R = I) it shares. What it constrains is how the
#     embedding moves where it does move: rigidly, and the same way for every image of the
#     group. A trained encoder is not invariant: under a shared pair its embeddings move
#     by an image-dependent map, which InfoNCE accepts as long as each image still picks
#     out its partner. lam is the price of the part of that motion that is no single
#     rotation, against InfoNCE: lam = 0 is SimCLR (any motion is free); a larger lam
#     makes the encoder turn the remaining motion into one shared rotation or remove it,
#     whichever costs InfoNCE less. Too large, and the encoder pays ever more InfoNCE for
#     it, down to the shortcut of (3): the term is zero for a collapsed encoder too, which
#     only uniformity resists. Whether what an augmentation changes (colour, say) then
#     survives in z is an empirical question; figures/README.md measures it at its
#     budget. The reference uses lam = 0.03 on CIFAR-10.
#
# (5) One pair (a, a') per group, or per batch. The derivation holds for any images
#     sharing one pair: a pair shared by the whole batch, and so by all its groups,
#     satisfies it as well. One pair per group is a design choice: each group is its own
#     test of "one augmentation moves these n images by one rotation", and every batch
#     holds a mix of augmentations. Why that mix might matter is a hypothesis: with a
#     forward pass per view set (there and here), a batch that all carries one a lets
#     BatchNorm's batch statistics absorb what a changes in common, so part of a may never
#     reach z. The CPU study in figures/README.md compares the two ways (--pair-per) but
#     does not isolate BatchNorm. The authors' CIFAR code draws one pair per batch: its
#     sampling runs once per step, before DataParallel splits the batch, so every GPU gets
#     that pair. Under torchrun, --pair-per batch draws one pair per process, from each
#     process's own random stream: as many pairs per global batch as processes.
#
# The diagonal of G - G' is zero for unit vectors, so leaving it out changes nothing
# there; the scaling 2/n (twice the mean over rows) is the reference implementation's.
def equivariance_loss(z1, z2, group_size):
    """Mean over groups of (2/n) sum_{i != j} (G_ij - G'_ij)^2, n = group_size: a 0-d
    float32 tensor (bfloat16 views are converted first) with gradient to both views.

    Rows [k n, (k+1) n) of z1 and z2 are group k: the same images under a and under a'.
    The sum has n (n - 1) terms, so the loss, and with it lam's effective weight, grows
    about linearly with n: a recipe's lam goes with its group size. A ValueError if
    group_size < 1 or B is not a multiple of it.
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

# -------------------------------------------------------------------------------------
# 4. The training step: four views, their projections, the objective
TERMS = ("loss", "info_nce", "alignment", "uniformity", "equivariance")   # one row per step

def train_step(model, optimizer, images, cfg, generator=None, aug=augment, machine=None):
    """One step on a uint8 batch; returns the TERMS (on the device, no host sync).

    CARE makes four views per image, as the authors' CIFAR code does: two per-image views
    (t x, t' x) for InfoNCE and two group-shared views (a x, a' x) for the equivariance
    loss; SimCLR only the first two. Each view set has its own forward pass, as in their
    code, so BatchNorm's statistics are per view set: see (5) above.
    """
    machine = machine or Machine()          # Part II: precision, memory layout, torchrun
    x = images.float().div_(255)
    views = [aug(x, 1, generator) for _ in range(2)]
    if cfg.method == "care":
        shared = cfg.group_size if cfg.pair_per == "group" else len(x)
        views += [aug(x, shared, generator) for _ in range(2)]
    with machine.precision():               # the encoder in 16 bits where that is fast
        z = [model(machine.layout(v))[1] for v in views]
    terms = objective(z, cfg, machine.gather)
    optimizer.zero_grad(set_to_none=True)
    machine.backward(terms[0], optimizer)   # loss.backward(); optimizer.step()
    return terms.detach()

def objective(z, cfg, gather=None):
    """The TERMS from the projections z = [z(t x), z(t' x), z(a x), z(a' x)] (SimCLR: the
    first two), a float32 tensor in TERMS' order with gradient to z: loss = contrastive
    term (cfg.contrastive: info_nce, or its uniformity half) + lam * equivariance loss,
    with cfg's lam, temperature and group_size. CARE records its equivariance term even
    at lam = 0; SimCLR records 0. Under torchrun, `gather` brings InfoNCE and
    its halves the views of every process as candidates (Part II, Machine.gather); a group
    never straddles two processes, so the equivariance loss takes the local views."""
    z1, z2 = z[0].float(), z[1].float()
    if gather is not None:
        z1, z2 = gather(z1), gather(z2)
    nce = info_nce(z1, z2, cfg.temperature)
    alignment, uniformity = alignment_uniformity(z1, z2, cfg.temperature)
    equi = (equivariance_loss(z[2], z[3], cfg.group_size) if cfg.method == "care"
            else torch.zeros((), device=z1.device))
    loss = (nce if cfg.contrastive == "infonce" else uniformity) + cfg.lam * equi
    return torch.stack([loss, nce, alignment, uniformity, equi])

# -------------------------------------------------------------------------------------
# 5. The epoch loop
def random_stream(device, *key):
    """A generator seeded by a key such as (seed, epoch, rank). Seeding each epoch afresh
    makes a resumed run draw exactly what the uninterrupted run draws, with no random
    state to save, and a run resumed on another device never replays an earlier epoch."""
    return torch.Generator(device).manual_seed(hash(key) % 2**63)

def train_epoch(run, cfg, epoch):
    """One pass over the training images in a fresh random order; returns the epoch's row.
    `run` (Part II, RunState) holds the network, optimizer, data and this process's place."""
    images, B = run.data.train_x, cfg.batch_size
    steps = len(images) // B                            # the last partial batch is dropped
    # The order is drawn on the CPU: a GPU's randperm depends on the GPU model for large N.
    order = torch.randperm(len(images), generator=random_stream("cpu", cfg.seed, epoch))
    order = order.to(images.device)
    generator = random_stream(images.device, cfg.seed, epoch, run.rank)   # augmentations
    losses = torch.zeros(steps, len(TERMS), device=images.device)
    progress = Progress(run, cfg, epoch, losses)        # Part II: what the host reads
    b = B // run.world                                  # one process's share of a batch
    for step in range(steps):
        # Consecutive images of a random order form the groups. Under torchrun each of the
        # run.world processes trains on its own slice of every global batch of B images.
        first = step * B + run.rank * b
        losses[step] = train_step(run.net, run.optimizer, images[order[first:first + b]], cfg,
                                  generator, run.aug, run.machine)
        run.scheduler.step()
        progress.update(step)       # every LOG_EVERY steps: the live line and a finite check
    return progress.row()

def train(run, cfg):
    """The epochs after run.epoch (0: a new run): train, monitor, save. The monitor (kNN
    top-1 and the geometry on the test split) runs before training, every knn_every
    epochs and after the last; end_epoch records the row and writes a checkpoint."""
    if run.epoch == 0:                                  # epoch 0: the untrained encoder
        end_epoch(run, cfg, {"epoch": 0, **dict.fromkeys(TERMS), "images_per_s": None,
                             "seconds": None, **monitor(run, cfg)})
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        row = train_epoch(run, cfg, epoch)
        if epoch % cfg.knn_every == 0 or epoch == cfg.epochs:
            row.update(monitor(run, cfg))
        end_epoch(run, cfg, row)

# -------------------------------------------------------------------------------------
# 6. Evaluation of the frozen backbone's features h: the kNN monitor and the linear probe
@torch.no_grad()
def knn_top1(train_h, train_y, test_h, test_y, k=200, temperature=0.5, chunk=1024):
    """Weighted kNN (the InstDisc/SimCLR monitor): for each test image, the k most
    cosine-similar training images (k at most their number; features of any length) vote
    for their class with weight exp(cosine / temperature). Top-1 in percent, a float, not
    rounded. Test images go `chunk` at a time (memory: chunk x N similarities)."""
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
    """The fast linear evaluation, test top-1 %: both splits standardised with the training
    split's per-feature mean and std (+ 1e-6), then fit_linear on these frozen features
    with a cosine schedule and no weight decay."""
    mu, sd = train_h.mean(0), train_h.std(0) + 1e-6
    return fit_linear(lambda: (train_h - mu) / sd, train_y, (test_h - mu) / sd, test_y,
                      epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.0,
                      seed=seed, cosine=True)

@torch.enable_grad()                            # also when called from a no_grad diagnostic
def fit_linear(epoch_features, train_y, test_h, test_y, *, epochs, batch_size, lr,
               weight_decay, seed, cosine):
    """Test top-1 % of an nn.Linear classifier trained by torch.optim.Adam(lr, weight_decay).
    Each epoch calls epoch_features() once and takes all its rows in a fresh random order,
    in batches of batch_size (the last may be smaller): a step per batch, its gradients
    zeroed first. The lr at step i of all steps is lr (1 + cos(pi i / steps)) / 2 if
    `cosine`, else lr. `seed` fixes the initial weights and the orders, and the global
    random stream is left alone: a probe run during training cannot change the training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Linear(test_h.shape[1], int(train_y.max()) + 1).to(test_h.device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_y) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, steps))) if cosine else 1.0)
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
# Part II, the machinery: a student may skip it.
# =====================================================================================

# -------------------------------------------------------------------------------------
# 7. Settings, each declared once: the command line, the settings line a run prints, the
# recipes and what a resume may change all come from this table. Its kinds, on --resume:
# "run" settings come from the checkpoint, and another value typed is refused; "epochs"
# may grow a constant schedule; "kept" ones come from the checkpoint unless typed;
# "machine" ones from this command line; a "mode" is what care.py does instead of training.
class Setting(NamedTuple):
    default: object
    kind: str
    help: str
    choices: tuple = None
    flag: bool = True       # False: no flag; a dataset's recipe may set it

S = Setting
SETTINGS = {
    "method": S("care", "run", "care: InfoNCE + lam * equivariance loss; simclr: InfoNCE alone",
                ("care", "simclr")),
    "contrastive": S("infonce", "run", "the contrastive term, or only its uniformity half",
                     ("infonce", "uniformity")),
    "lam": S(0.03, "run", "weight of the equivariance loss (it goes with --group-size)"),
    "group_size": S(16, "run", "images per Gram matrix, sharing one pair (a, a')"),
    "pair_per": S("group", "run", "draw (a, a') per group, or per batch (the authors' code)",
                  ("group", "batch")),
    "temperature": S(0.5, "run", "InfoNCE temperature tau"),
    "arch": S("resnet18", "run", "backbone; the CIFAR stem below 64 px", ARCHS),
    "feature_dim": S(128, "run", "dimension of the projection z", flag=False),
    "dataset": S("cifar10", "run", "downloaded by torchvision, or an image folder (folder, "
                 "imagenet100)", ("cifar10", "cifar100", "stl10", "imagenet100", "folder")),
    "image_size": S(32, "run", "images are resized once, at load time"),
    "train_subset": S(0, "run", "a fixed random subset of N training images (0: all)"),
    "crop_scale_min": S(0.08, "run", "smallest crop, as a share of the area", flag=False),
    "blur_kernel": S(3, "run", "Gaussian blur kernel size (odd)", flag=False),
    "epochs": S(200, "epochs", "0: only evaluate the initial encoder"),
    "batch_size": S(256, "run", "images per step, over all processes"),
    "optimizer": S("adam", "run", "sgd: with momentum 0.9", ("adam", "sgd")),
    "lr": S(1e-3, "run", "learning rate"),
    "weight_decay": S(1e-6, "run", "weight decay"),
    "lr_schedule": S("constant", "run", "cosine: after a linear warm-up", ("constant", "cosine")),
    "warmup_epochs": S(10, "run", "warm-up epochs of the cosine schedule", flag=False),
    "seed": S(0, "run", "seeds the model, the data order and the augmentations"),
    "data_root": S("./data", "kept", "download folder, or DIR with DIR/{train,test}/<class>/"),
    "knn_every": S(10, "kept", "kNN top-1 and geometry every N epochs (and at the end)"),
    "knn_k": S(200, "kept", "neighbours in the weighted kNN", flag=False),
    "linear_eval": S("fast", "kept", "reference: also the authors' protocol (slow)",
                     ("fast", "reference")),
    "out": S(None, "kept", "run folder (default: runs/<method>-<dataset>; resuming, the "
             "checkpoint's)"),
    "device": S("auto", "machine", "auto: CUDA if present", ("auto", "cpu", "cuda")),
    "precision": S("auto", "machine", "of the encoder; losses stay fp32. auto: bf16 where "
                   "native, fp16 on older GPUs", ("auto", "bf16", "fp16", "fp32")),
    "compile": S(False, "machine", "torch.compile the encoder for training"),
    "sync_bn": S(False, "machine", "torchrun on GPUs: BatchNorm over the global batch"),
    "resume": S(None, "mode", "continue the run of this checkpoint.pt, with its settings"),
    "eval_only": S(False, "mode", "with --resume: only evaluate the checkpoint"),
    "compare": S((), "mode", "pool the runs in these folders by setting: --out/compare.png"),
    "augmentations": S(False, "mode", "draw the views of two groups: --out/augmentations.png"),
    "benchmark": S(False, "mode", "time training steps: --out/benchmark.json"),
    "exercise": S((), "mode", "a course's copy of care.py, these functions to write: "
                  "--out/care.py (default --out: course)"),
}
# The reference recipe of each dataset (the authors' scripts in Sharut/CARE), as its
# differences from the defaults above, which are CIFAR-10's. Flags typed win.
RECIPES = {"cifar10": {}, "folder": {}, "cifar100": dict(lam=0.001, group_size=64),
           "stl10": dict(lam=0.01, group_size=32, optimizer="sgd", lr=0.06, weight_decay=5e-4,
                         lr_schedule="cosine"),
           "imagenet100": dict(image_size=224, arch="resnet50", group_size=8, pair_per="batch",
                               lam=0.005, temperature=0.2, optimizer="sgd", lr=0.4,
                               weight_decay=1e-4, lr_schedule="cosine", warmup_epochs=0,
                               crop_scale_min=0.2, blur_kernel=5, knn_k=20)}
FOLDERS = ("folder", "imagenet100")         # read from an image folder, never downloaded
LOG_EVERY = 20                              # steps between the host's reads of the losses
PROBE_EPOCHS = 100                          # of the final linear evaluation(s)

class CareError(Exception):
    """A problem with the user's input or environment: one line, no traceback; exit code 2
    for a usage error, 1 for anything else."""
    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code

# -------------------------------------------------------------------------------------
# 8. Data: each split held whole, as uint8 on the device
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
    return TF.center_crop(TF.resize(x, size, antialias=True), size)   # no-ops at size x size

def _load_torchvision(name, root, train):
    cls = getattr(torchvision.datasets, name.upper())       # CIFAR10, CIFAR100, STL10
    kw = {"split": "train+unlabeled" if train else "test"} if name == "stl10" else {"train": train}
    try:                                                    # downloads what is missing
        ds = cls(root, download=True, **kw)
    except Exception as e:
        raise CareError(
            f"could not download {name} into {root} ({_first_line(e)}). Offline? Get it on a "
            f"connected machine with python -c \"import torchvision; torchvision.datasets."
            f"{cls.__name__}('data', download=True)\" and copy data/ to --data-root, or use "
            f"--dataset folder --data-root DIR with DIR/train/<class>/ and DIR/test/<class>/"
            f" image folders", code=1) from None
    x = torch.from_numpy(ds.data)
    x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x  # CIFAR stores HWC
    y = torch.as_tensor(ds.targets if hasattr(ds, "targets") else ds.labels, dtype=torch.long)
    return x.contiguous(), y, list(ds.classes)

def _load_folder(root, split, size, class_to_idx=None):
    """An image folder DIR/<split>/<class>/*.jpg|png -> uint8 images, labels, classes."""
    folder, ds = os.path.join(root, split), torchvision.datasets.folder
    if not os.path.isdir(folder):
        raise CareError(f"{root} has no {split}/ folder: --dataset folder expects "
                        f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
    try:
        classes = ds.find_classes(folder)[1]
        lacking = sorted(set(classes) - set(class_to_idx or classes))
        if lacking:                             # its images could be neither learnt nor scored
            raise CareError(f"{folder} has class {lacking[0]}, which {root}/train/ lacks: add "
                            f"it there, or remove it")
        samples = ds.make_dataset(folder, class_to_idx or classes, extensions=ds.IMG_EXTENSIONS)
    except OSError as e:                        # no images (FileNotFoundError), no permission
        raise CareError(f"cannot read images in {folder}: {_first_line(e)}") from None
    images = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)

    def decode(i):                              # once, at load time, on every core
        try:                                    # (PIL and resize release the GIL)
            images[i] = _square(TF.pil_to_tensor(ds.default_loader(samples[i][0])), size)
        except Exception as e:                  # unreadable, truncated, a decompression bomb
            raise CareError(f"cannot decode {samples[i][0]}: {_first_line(e)}", code=1) from None
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(decode, range(len(samples))))
    return images, torch.tensor([c for _, c in samples], dtype=torch.long), class_to_idx or classes

def channel_stats(x):
    """Per-channel mean and std of a uint8 image tensor, in [0, 1] units; the std at least
    one grey level (1/255), so that a channel that never varies does not divide by 0."""
    total = torch.zeros(2, 3, dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.double().div(255).transpose(0, 1).flatten(1)           # (3, pixels)
        total += torch.stack([c.sum(1), c.square().sum(1)])
    mean = total[0] / (x.numel() / 3)
    std = (total[1] / (x.numel() / 3) - mean.square()).clamp_min(1 / 255**2).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())

def load_data(dataset, root, image_size, train_subset=0, device="cpu"):
    """Load both splits, resize them once to image_size, and put them on `device`."""
    if dataset in FOLDERS:                      # (validate() checked that root exists)
        train_x, train_y, class_to_idx = _load_folder(root, "train", image_size)
        test_x, test_y, _ = _load_folder(root, "test", image_size, class_to_idx)
        classes = list(class_to_idx)
    else:
        train_x, train_y, classes = _load_torchvision(dataset, root, train=True)
        test_x, test_y, _ = _load_torchvision(dataset, root, train=False)
        train_x, test_x = (torch.cat([_square(c, image_size) for c in x.split(4096)])
                           for x in (train_x, test_x))
    if train_subset > len(train_x):
        raise CareError(f"--train-subset {train_subset}, but the training split has "
                        f"{len(train_x)} images")
    if train_subset:                            # one fixed random subset, whatever --seed
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
        train_x, train_y = train_x[keep[:train_subset]], train_y[keep[:train_subset]]
    mean, std = channel_stats(train_x)
    return Data(*(t.to(device) for t in (train_x, train_y, test_x, test_y)), classes, mean, std)

# -------------------------------------------------------------------------------------
# 9. The image operations augment() calls, for a whole batch with one parameter per image.
# They follow the formulas of torchvision.transforms.functional (test_care.py checks each
# against it); torchvision lacks only the per-image *tensor* of factors.
@functools.lru_cache(maxsize=None)
def _const(values, device):
    """A small constant tensor, made once per device: built afresh every step, it would be
    a host-to-device copy, and such a copy makes the host wait for the GPU."""
    return torch.tensor(values, dtype=torch.float32, device=device)

def _per_image(v):                              # (B,) or (B, 1) -> (B, 1, 1, 1): per image
    return v.view(-1, 1, 1, 1)

rgb_to_grayscale = TF.rgb_to_grayscale          # ITU-R 601-2 luma: (B, 3, H, W) -> (B, 1, H, W)

def _blend(x, y, factor):                       # torchvision's _blend
    return (factor * x + (1 - factor) * y).clamp(0, 1)

def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)

def adjust_contrast(x, factor):                 # towards its mean grey level (one per image)
    return _blend(x, rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True), factor)

def adjust_saturation(x, factor):               # towards its own grayscale version
    return _blend(x, rgb_to_grayscale(x), factor)

def adjust_hue(x, shift):
    """Rotate the hue channel of HSV by `shift` turns: a float for the whole batch or a (B,)
    tensor, one per image; any real number (1 is a full turn, 0.75 the same as -0.25).
    Pixels without a hue (black, grey, white) stay as they are."""
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
    """Gaussian blur of (B, C, H, W) images, one sigma per image (a (B,) tensor), an odd
    kernel_size, reflect padding: torchvision's gaussian_blur, image by image."""
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
    image, else the whole image. Boxes keep real-valued corners (torchvision rounds them)
    and roi_align samples them bilinearly at the output pixel centres: torchvision's
    bilinear resize of the crop, but within half a pixel of the box edge, where roi_align
    reads the neighbouring pixels instead of repeating the edge.
    """
    B, _, H, W = x.shape
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u_scale)          # (B, 10)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u_ratio)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= W) & (h <= H)
    chosen = fits.int().argmax(1, keepdim=True)                          # first fitting try
    w = torch.where(fits.any(1), w.gather(1, chosen)[:, 0], W)
    h = torch.where(fits.any(1), h.gather(1, chosen)[:, 0], H)
    x0, y0 = (W - w) * u_pos[:, 0], (H - h) * u_pos[:, 1]
    idx = torch.arange(B, device=x.device, dtype=x.dtype)
    boxes = torch.stack([idx, x0, y0, x0 + w, y0 + h], 1)
    return roi_align(x, boxes, output_size=(H, W), sampling_ratio=1, aligned=True)

def normalize(x, mean, std):                    # the last step of every view
    mean, std = (_const(tuple(v), x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std

def augmenter(cfg, mean, std):                  # augment() with this run's settings
    return functools.partial(augment, mean=mean, std=std, scale_min=cfg.crop_scale_min,
                             blur_kernel=cfg.blur_kernel)

# -------------------------------------------------------------------------------------
# 10. How this machine runs the arithmetic: precision, memory layout, torchrun.
# The encoder runs in a 16-bit float where the hardware has one natively, the losses in
# float32; channels_last is the layout fast convolutions want.
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The public all-gather with gradient (Machine.gather) is marked deprecated: hush that.
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)

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

class Machine:
    """What train_step hands its arithmetic to (Part I holds none); Machine(): fp32, one process."""
    def __init__(self, dtype=torch.float32, channels_last=False, device=torch.device("cpu")):
        self.dtype, self.device_type = dtype, device.type
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # fp16 needs its loss scaled against underflowing gradients; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def precision(self):                        # autocast: the encoder's products in self.dtype
        return torch.autocast(self.device_type, self.dtype, enabled=self.dtype != torch.float32)

    def layout(self, x):
        return x.contiguous(memory_format=self.memory_format)

    def gather(self, z):
        """Under torchrun, each of W processes holds b = B / W images of the global batch,
        and InfoNCE needs all 2B views as candidates: gather z from every process, with
        gradient. Every process then computes the same InfoNCE L over the global batch. In
        backward the gather hands each process the sum over processes of dL/d(its own z),
        W times its share of the gradient; DDP averages parameter gradients over the W
        processes, so the update is dL/dtheta, the one-process gradient on the global batch
        (test_care.py checks this on two processes)."""
        return torch.cat(dist_nn.all_gather(z)) if dist.is_initialized() else z

    def backward(self, loss, optimizer):        # with fp16's loss scaling
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

def build_model(cfg, device, machine):
    """The encoder, and what training calls: it wrapped in DDP (torchrun), compiled (--compile)."""
    model = Encoder(cfg.arch, cfg.feature_dim, stem_for(cfg.image_size))
    model = model.to(device, memory_format=machine.memory_format)
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                              else None) if dist.is_initialized() else model
    return model, torch.compile(net, dynamic=False) if cfg.compile else net

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

def setup(cfg):
    """The device (one GPU per process under torchrun), the process group, the seed."""
    device = pick_device(cfg.device)
    if torchrun() and not dist.is_initialized():
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

# -------------------------------------------------------------------------------------
# 11. The run: its state, progress, checkpoints and resume, Ctrl-C, the final evaluation
@dataclass
class RunState:
    """What the epoch loop, the checkpoints and the evaluation share."""
    model: nn.Module                # the encoder: evaluation, checkpoints, figures
    net: nn.Module                  # what training calls: the encoder, or its DDP/compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    machine: Machine
    data: Data
    aug: functools.partial          # augment() with this run's statistics
    metrics: dict                   # the record: metrics.json
    log: object                     # print(), and the same line into train.log
    rank: int = 0                   # this process, of `world` (torchrun)
    world: int = 1
    epoch: int = 0                  # the last finished epoch, saved in the checkpoint
    clock: float = 0.0              # time.time() at the start of the whole run
    feats: tuple = None             # the last monitor's (train_h, train_y, test_h, test_y)

class Progress:
    """train_epoch's view from the host. Every LOG_EVERY steps it reads the new loss rows
    once (averaged over processes under torchrun: every process stops, or none), stops on
    a non-finite loss, and every 30 s prints step, loss, images/s and the time left."""
    def __init__(self, run, cfg, epoch, losses):
        self.run, self.cfg, self.epoch, self.losses = run, cfg, epoch, losses
        self.read, self.start, self.printed = 0, time.time(), time.time()

    def update(self, step):
        steps, run, cfg, epoch = len(self.losses), self.run, self.cfg, self.epoch
        if (step + 1) % LOG_EVERY and step + 1 < steps:
            return
        seen = self.losses[self.read:step + 1]          # a view: the epoch's mean sees the average
        if run.world > 1:
            dist.all_reduce(seen)
            seen /= run.world
        seen = seen.cpu()                               # the one host sync per interval
        bad = (~torch.isfinite(seen)).any(1).nonzero()
        if len(bad):
            kept = (f"{cfg.out} keeps the checkpoint of epoch {epoch - 1}" if epoch > 1
                    else "no checkpoint had been written yet")
            raise CareError(f"non-finite loss at epoch {epoch} step {self.read + int(bad[0]) + 1}"
                            f"/{steps}: stopped; {kept}. Start a new run with a lower --lr (or "
                            f"a smaller --lam or --weight-decay, a larger --temperature)", code=1)
        self.read, elapsed = step + 1, time.time() - self.start
        eta, per_step = elapsed / self.read * (steps - self.read), elapsed / self.read
        line = (f"epoch {epoch}/{cfg.epochs} step {self.read}/{steps} loss {seen[-1, 0]:.4f} | "
                f"{self.read * cfg.batch_size / elapsed:.0f} img/s | eta epoch {_hms(eta)}, run "
                f"{_hms(eta + per_step * steps * (cfg.epochs - epoch))}")
        if run.rank == 0 and time.time() - self.printed > 30:
            print(line, flush=True)
            self.printed = time.time()

    def row(self):
        """The epoch's row of the record: the mean of each term, speed, time, learning rate."""
        seconds, terms = time.time() - self.start, dict(zip(TERMS, self.losses.mean(0).tolist()))
        if self.cfg.method != "care":
            terms["equivariance"] = None
        return {"epoch": self.epoch, **terms, "knn_top1": None,
                "images_per_s": len(self.losses) * self.cfg.batch_size / seconds,
                "seconds": seconds, "lr": self.run.scheduler.get_last_lr()[0]}

def end_epoch(run, cfg, row):
    """Process 0 records the row and, after a trained epoch, writes the checkpoint, then
    metrics.json (each atomically); the other processes wait for it."""
    if run.rank == 0:
        run.metrics["epochs"].append(row)
        if row["epoch"] >= 1:
            run.metrics["wall_time_s"] = time.time() - run.clock
            state = {k: getattr(run, k).state_dict() for k in ("model", "optimizer", "scheduler")}
            try:
                atomic_save({**state, "epoch": row["epoch"], "config": vars(cfg), "metrics":
                             run.metrics, "scaler": run.machine.scaler.state_dict()},
                            os.path.join(cfg.out, "checkpoint.pt"))
                run.epoch = row["epoch"]
                atomic_save(run.metrics, os.path.join(cfg.out, "metrics.json"))
            except CareError as e:                      # the folder went away, the disk is full
                raise CareError(f"{e}; {kept(run, cfg)}", code=1) from None
        run.log(table_row(row))
    if run.world > 1:
        dist.barrier()

def interrupted(run, cfg, evaluating=False):
    """Ctrl-C or SIGTERM: keep the last finished epoch, say how to go on (in train.log too)."""
    run.metrics["epochs"] = [r for r in run.metrics["epochs"] if r["epoch"] <= run.epoch]
    if run.epoch >= 1 and run.rank == 0 and not evaluating:     # end_epoch may have stopped
        atomic_save(run.metrics, os.path.join(cfg.out, "metrics.json"))  # between its writes
    what = "the final evaluation" if evaluating else f"epoch {run.epoch + 1}"
    run.log(f"interrupted during {what}: {kept(run, cfg, evaluating)}")
    raise SystemExit(130)

def kept(run, cfg, evaluate=False):
    """What a stopped run keeps, and the command that goes on from it."""
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    if run.epoch < 1 or not os.path.isfile(ckpt):
        return "no checkpoint is kept"
    launcher = "python" if run.world == 1 or evaluate else f"torchrun --nproc_per_node={run.world}"
    return (f"{ckpt} and metrics.json keep epoch {run.epoch}; "
            f"{'evaluate it' if evaluate else 'go on'} with: {launcher} care.py --resume {ckpt}"
            + " --eval-only" * evaluate)

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
    except (OSError, RuntimeError) as e:        # torch.save reports a file's errors as these
        raise CareError(f"cannot write {path} ({_first_line(e)})", code=1) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_checkpoint(path, what="--resume"):
    """A checkpoint.pt of care.py as plain tensors and Python values (weights_only: no
    pickled code), checked before any work: care.py's settings, and weights that fit them."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        raise CareError(f"{what} {path} is a folder: pass the checkpoint.pt in it"
                        + (f", {inside}" if os.path.isfile(inside) else " (it has none)"))
    if not os.path.isfile(path):
        raise CareError(f"{what} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CareError(f"{what} {path}: not a checkpoint.pt of care.py (torch.load cannot "
                        f"read it)") from None
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CareError(f"{what} {path}: not a care.py checkpoint: {problem}")
    return ckpt

def checkpoint_problem(ckpt):
    """What makes ckpt no checkpoint of care.py's (its parts, its settings, its weights)."""
    c = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(c, dict):
        return "it has no table of settings (config)"
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch") if k not in ckpt] + [
        k for k, s in SETTINGS.items() if s.kind in ("run", "epochs") and k not in c]
    m = ckpt.get("metrics")
    if missing or not (isinstance(m, dict) and {"epochs", "wall_time_s"} <= m.keys()):
        return f"it lacks {', '.join(missing) or 'its record (metrics)'}"
    for k, s in SETTINGS.items():
        if s.kind == "run" and s.choices and c[k] not in s.choices:
            return f"its {_flag(k, c[k])} is none of {', '.join(s.choices)}"
    try:
        Encoder(c["arch"], c["feature_dim"], stem_for(c["image_size"])).load_state_dict(
            ckpt["model"])
    except Exception as e:
        return f"its weights do not fit its settings ({_first_line(e)[:120]})"

def load_encoder(path):
    """A checkpoint's trained encoder, in eval mode on the CPU: encoder(x) gives (h, z) for
    images in [0, 1] normalised by encoder.mean and encoder.std (the run's channel
    statistics); encoder.backbone alone is the torchvision ResNet, h = encoder.backbone(x)."""
    ckpt = load_checkpoint(path, "load_encoder:")
    c = ckpt["config"]
    encoder = Encoder(c["arch"], c["feature_dim"], stem_for(c["image_size"]))
    encoder.load_state_dict(ckpt["model"])
    encoder.mean, encoder.std = (ckpt["metrics"].get(k) for k in ("data_mean", "data_std"))
    return encoder.eval()

def restore(ckpt, run):
    """Weights, optimizer, scheduler, loss scaler and record (random streams: none kept)."""
    run.model.load_state_dict(ckpt["model"])                # load_checkpoint checked the fit
    # The optimizer's kernel (fused on CUDA, not on a CPU) belongs to this machine;
    # load_state_dict would take it from the checkpoint's groups (a CPU run's on a GPU).
    for mine, saved in zip(run.optimizer.param_groups, ckpt["optimizer"]["param_groups"]):
        saved.update(fused=mine["fused"], foreach=mine["foreach"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.machine.scaler.load_state_dict(ckpt.get("scaler") or run.machine.scaler.state_dict())
    run.epoch = ckpt["epoch"]
    run.metrics["wall_time_s"] = ckpt["metrics"]["wall_time_s"]
    run.metrics["epochs"] = [r for r in ckpt["metrics"]["epochs"] if r["epoch"] <= run.epoch]

def _first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]

def _hms(seconds):
    return f"{int(seconds) // 3600}:{int(seconds) // 60 % 60:02d}:{int(seconds) % 60:02d}"

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

def launch(cfg, ckpt=None):
    """Train (or with --eval-only just evaluate), recording everything under cfg.out."""
    device = setup(cfg)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    log = logger(cfg.out) if rank == 0 else lambda msg="": None     # process 0 speaks
    machine = Machine(amp_dtype(cfg.precision, device), channels_last=True, device=device)
    precision = str(machine.dtype).removeprefix("torch.")
    log(f"care.py | {cfg.method} | {cfg.dataset} {cfg.image_size}px | {cfg.arch} | "
        f"{device_name(device)}{f' x {world} processes' if world > 1 else ''} | {precision}"
        f" | out: {cfg.out}\nsettings: {command_line(cfg)}")
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
    model, net = build_model(cfg, device, machine)
    optimizer, scheduler = make_optimizer(model, cfg, len(data.train_x) // cfg.batch_size)
    metrics = {"config": vars(cfg), "device": device_name(device), "world_size": world,
               "precision": precision, "data_mean": data.mean, "data_std": data.std,
               "wall_time_s": 0.0, "linear_top1": None, "epochs": []}
    run = RunState(model, net, optimizer, scheduler, machine, data,
                   augmenter(cfg, data.mean, data.std), metrics, log, rank, world)
    if ckpt is not None:
        restore(ckpt, run)
        log(f"resumed from {cfg.resume} after epoch {ckpt['epoch']}")
    run.clock = time.time() - metrics["wall_time_s"]    # wall time of the whole run
    # From here SIGTERM is Ctrl-C: it keeps what is trained. Before, it ends the process at
    # once, so torchrun's agent stops the others the moment one refuses its input.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if not cfg.eval_only:
        log("\n".join([HEADER, *map(table_row, metrics["epochs"])]))  # resuming: rows so far
        try:
            train(run, cfg)
        except KeyboardInterrupt:                       # Ctrl-C, or SIGTERM (above)
            interrupted(run, cfg)
    try:
        return evaluate_run(cfg, run) if rank == 0 else None
    except KeyboardInterrupt:
        interrupted(run, cfg, evaluating=True)

CLAIMED = []                                # the open train.log of this process's run

def logger(folder):
    """print(), and the same line into folder/train.log, which stays open and locked while
    the run lives (POSIX flock): a second run started into the folder is refused, not let
    interleave its checkpoints with this one's."""
    CLAIMED.append(f := open(os.path.join(folder, "train.log"), "a"))
    try:
        import fcntl                            # not on Windows: no lock there
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        raise CareError(f"{folder} is in use by another care.py run: wait for it to end, or "
                        f"choose another --out") from None

    def log(msg=""):
        print(msg, flush=True)
        f.write(msg + "\n")
        f.flush()
    return log

def evaluate_run(cfg, run):
    """Process 0, after training: linear probe(s) and geometry; the record and figures."""
    model, data, metrics, log = run.model, run.data, run.metrics, run.log
    feats = run.feats or features(model, data)          # the monitor ran after the last epoch
    t = time.time()
    metrics["linear_top1"] = linear_probe(*feats, epochs=PROBE_EPOCHS, seed=cfg.seed)
    log(f"linear probe top-1: {metrics['linear_top1']:.2f}% "
        f"({PROBE_EPOCHS} epochs on frozen features, {time.time() - t:.1f}s)")
    if cfg.linear_eval == "reference":
        t = time.time()
        metrics["linear_top1_reference"] = reference_linear_eval(model, data, run.aug, cfg.seed,
                                                                 feats[2])
        log(f"reference linear evaluation top-1: {metrics['linear_top1_reference']:.2f}% "
            f"({PROBE_EPOCHS} epochs on freshly augmented images, {time.time() - t:.1f}s)")
    metrics["diagnostics"] = d = geometry_diagnostics(model, data, run.aug)
    hue = lambda key: "  ".join(f"{k}: {v:.3f}" for k, v in d[key].items())
    log(f"geometry on {d['images']} test images x {d['pairs']} augmentation pairs: gram error "
        f"{d['gram_error']:.4f}, best rotation turns {d['rotation_angle_deg']:.1f} degrees\n"
        f"  residual share of z(a'x) given z(ax): identity {d['identity_residual']:.3f}, "
        f"rotation {d['procrustes_residual']:.3f}, linear {d['linear_residual']:.3f}\n"
        f"  hue cosine of h: {hue('hue_cosine')}\n  hue cosine of z: {hue('hue_cosine_z')}\n"
        f"  colour probe top-1 (chance {100 / HUE_TURNS:.0f}%): h {d['colour_probe_top1']:.2f}%, "
        f"z {d['colour_probe_top1_z']:.2f}%\n  one family at a time, rotation residual: "
        + ", ".join(f"{f} {v['procrustes_residual']:.3f}" for f, v in d["by_family"].items()))
    metrics["wall_time_s"] = time.time() - run.clock
    atomic_save(metrics, os.path.join(cfg.out, "metrics.json"))
    method = cfg.method.upper()
    groups, title = [(method, [metrics])], f"{method} | {run_title(metrics)}"
    plot(groups, os.path.join(cfg.out, "curves.png"), ["alignment", "uniformity", "equivariance",
         "knn", "gram", "procrustes", "angle", "hue", "hue_z", "colour"], 5, title)
    plot(groups, os.path.join(cfg.out, "geometry.png"),
         ["residuals", "hue_shifts", "families", "gram_matrices"], 2, title)
    log(f"done in {_hms(metrics['wall_time_s'])}: {os.path.join(cfg.out, 'metrics.json')}, "
        f"curves.png, geometry.png")
    return metrics

# -------------------------------------------------------------------------------------
# 12. Features (float32, process 0), the monitor, the authors' linear evaluation
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

def monitor(run, cfg):
    """Process 0: kNN top-1 and the cheaper geometry (2 pairs, no per-family fit) of the
    encoder as it is now; its features are kept for the final evaluation."""
    if run.rank != 0:
        return {}
    run.feats = features(run.model, run.data)
    return {"knn_top1": knn_top1(*run.feats, k=cfg.knn_k),
            **geometry_diagnostics(run.model, run.data, run.aug, n_pairs=2, full=False)}

def reference_linear_eval(model, data, aug, seed, test_h):
    """--linear-eval reference, the authors' CIFAR protocol: a linear layer (Adam 1e-3, weight
    decay 1e-6, batch 512) on the frozen backbone (in eval mode here, in train mode there),
    fed freshly augmented training images every epoch and tested on un-augmented ones."""
    train_x, train_y = labelled(data)
    g = torch.Generator(train_x.device).manual_seed(seed)
    fresh = lambda: embed(model, train_x, lambda x: aug(x, 1, g))[0]
    return fit_linear(fresh, train_y, test_h, data.test_y, epochs=PROBE_EPOCHS, batch_size=512,
                      lr=1e-3, weight_decay=1e-6, seed=seed, cosine=False)

# -------------------------------------------------------------------------------------
# 13. Geometry diagnostics: the paper's claims, measured on held-out images
# K fixed augmentation pairs (a, a'), each applied to the same N test images, give
# Z = z(a x) and Z' = z(a' x). CARE's loss says Z Z^T = Z' Z'^T, i.e. Z' = Z R^T for an
# orthogonal R. We measure how far that holds, against two reference maps: the identity
# (pure invariance, SimCLR's ideal) and an unconstrained linear map (the most a linear
# map can explain). Always: linear <= orthogonal <= identity. How far the best orthogonal
# map turns (its angle) says whether the rotations are small, as alignment asks.
HUE_TURNS = 10                  # the colour probe turns hue by k/10 of a turn: chance 10%
# augment()'s columns by family, and the switch that turns the family on (the crop has none).
FAMILIES = {"crop": (("crop_area", "crop_aspect", "crop_position"), None),
            "flip": ((), "flip"), "colour jitter": (("jitter_strengths",), "jitter"),
            "grayscale": ((), "grayscale"), "blur": (("blur_sigma",), "blur")}

def family_pair(family, g):
    """Parameters of a pair (a, a') equal but for one family: a without it, a' with it at a
    fresh strength (two different crops for "crop")."""
    names, switch = FAMILIES[family]
    u = torch.rand(1, 1, N_UNIFORMS, device=g.device, generator=g)
    u2 = u.clone()
    columns = [i for name in names for i in range(N_UNIFORMS)[AUG_COLUMNS[name]]]
    u2[..., columns] = torch.rand(1, 1, len(columns), device=g.device, generator=g)
    if switch is not None:                      # on below its probability: 1 off, 0 on
        u[..., AUG_COLUMNS[switch]], u2[..., AUG_COLUMNS[switch]] = 1.0, 0.0
    return u, u2

def procrustes(Z, Z2):
    """The orthogonal Q minimising ||Z Q - Z'|| (orthogonal Procrustes, nothing centred): Q =
    U V^T from the SVD Z^T Z' = U S V^T. Q may be a reflection (det -1): "rotation" below
    means either."""
    U, _, Vh = torch.linalg.svd(Z.T @ Z2)
    return U @ Vh

def residuals(Z, Z2):
    """How much of Z' each map of Z leaves unexplained: ||Z M - Z'||^2 over Z''s total
    variance ||Z' - mean(Z')||^2, for M the identity, the best orthogonal map (procrustes)
    and the best linear map (least squares), neither with an intercept."""
    Z, Z2 = Z.double().cpu(), Z2.double().cpu()
    total = (Z2 - Z2.mean(0)).square().sum()
    maps = {"identity": torch.eye(Z.shape[1], dtype=Z.dtype), "procrustes": procrustes(Z, Z2),
            "linear": torch.linalg.lstsq(Z, Z2).solution}
    return {f"{k}_residual": ((Z @ M - Z2).square().sum() / total).item() for k, M in maps.items()}

def rotation_angle_deg(Z, Q):
    """How far the orthogonal map z -> z Q turns the embeddings Z (rows of any length): the
    mean over rows of the angle between z and z Q, in degrees (not the angle of the mean
    cosine). 0 for the identity, in float32 too, where a cosine can round past 1; theta
    for a turn by theta in every plane. (Averaging the phases of Q's eigenvalues instead
    would count the directions no embedding uses, where the best map is arbitrary.)"""
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
        Z, Z2 = (embed(model, x, lambda v: aug(v, len(v), g, u=p), len(x))[1].double().cpu()
                 for p in u)                    # float64 on the CPU, once, for every measure
        for k, v in {"gram_error": gram_error(Z, Z2), **residuals(Z, Z2),
                     "rotation_angle_deg": rotation_angle_deg(Z, procrustes(Z, Z2))}.items():
            out[k] = out.get(k, 0.0) + v / n_pairs
    return out

def colour_probe(by_turn, seed=0):
    """Can the hue turn be read from the embedding? by_turn[k] holds the embeddings of the
    same n images turned by k/K. linear_probe(batch_size=64, lr=1e-2, seed=seed) learns k
    from the first n // 2 images of every turn and is tested on the others (unseen
    images): top-1 in percent, chance 100/K. A cosine says how far a turn moves an
    embedding; this says whether the turn stays readable."""
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

# -------------------------------------------------------------------------------------
# 14. Plots (matplotlib) from the records in metrics.json
def _stats(values):
    """(mean, standard deviation) of the numbers among values; (None, None) if none."""
    v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
    return (None, None) if not len(v) else (v.mean().item(), v.std().item() if len(v) > 1 else 0.0)

def _value(record, key):
    """record[key]; a tuple key reads nested records: ("hue_cosine", "0.5")."""
    for k in key if isinstance(key, tuple) else (key,):
        record = record.get(k) if isinstance(record, dict) else None
    return record

# The panels drawn against the epoch: name -> (title, keys: the first solid, the next dashed).
CURVES = {
    **{k: (f"{k} (training)", [k]) for k in TERMS[1:]},
    "knn": ("kNN top-1 % on the test split", ["knn_top1"]),
    "gram": ("Gram error (test)", ["gram_error"]),
    "procrustes": ("unexplained share of z(a'x):\nrotation (solid), identity (dashed)",
                   ["procrustes_residual", "identity_residual"]),
    "angle": ("rotation (degrees)", ["rotation_angle_deg"]),
    **{f"hue{s}": (f"hue cosine of {s[1:] or 'h'}: 0.1 turn (solid), 0.5 (dashed)",
                   [(f"hue_cosine{s}", "0.1"), (f"hue_cosine{s}", "0.5")]) for s in ("", "_z")},
    "colour": (f"colour probe top-1 %: h (solid), z (dashed);\nchance {100 / HUE_TURNS:.0f}%",
               ["colour_probe_top1", "colour_probe_top1_z"])}

def _curve(ax, groups, title, keys):
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

def _bars(ax, groups, names, layers, title):
    """A bar per group and name; layers[j][i] is the key of name i in layer j, the first
    layer light, a second (smaller) one on top of it."""
    width = 0.8 / len(groups)
    for i, (label, ms) in enumerate(groups):
        for keys, alpha in zip(layers, (0.35, 1.0)[2 - len(layers):]):
            v = [_stats([_value(m.get("diagnostics") or {}, key) for m in ms]) for key in keys]
            ax.bar([j + i * width for j in range(len(names))], [a or 0 for a, _ in v], width,
                   yerr=[b or 0 for _, b in v], color=f"C{i}", alpha=alpha,
                   label=label if alpha == 1 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
    ax.set(title=title, ylabel="unexplained share of variance")

def _residual_bars(ax, groups):
    names = ["identity", "procrustes", "linear"]
    _bars(ax, groups, names, [[f"{n}_residual" for n in names]],
          "How well z(a x) predicts z(a' x):\nidentity, best rotation, best linear map")

def _family_bars(ax, groups):
    _bars(ax, groups, list(FAMILIES), [[("by_family", f, f"{k}_residual") for f in FAMILIES]
                                       for k in ("identity", "procrustes")],
          "a, a' differ in one family only: unexplained\nby identity (light), by a rotation (dark)")

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
    d = groups[0][1][0]["diagnostics"]["gram_matrices"]     # drawn only by evaluate_run
    G, G2 = torch.tensor(d["G"]), torch.tensor(d["G_prime"])
    n, gap, D = len(G), torch.full((len(G), 1), float("nan")), G - G2
    ax.imshow(torch.cat([G, gap, G2, gap, D.abs()], 1).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks([(n - 1) / 2, 1.5 * n, 2.5 * n + 1], ["G = Z Z^T", "G' = Z' Z'^T", "|G - G'|"])
    ax.set(yticks=[], title=f"{n} test images, Z = z(a x), Z' = z(a' x) (-1 blue, +1 red)\n"
           f"mean off-diagonal (G - G')^2: {(D.square().sum() / (n * (n - 1))).item():.4f}")

PANELS = {**{k: functools.partial(_curve, title=t, keys=ks) for k, (t, ks) in CURVES.items()},
          "residuals": _residual_bars, "families": _family_bars, "hue_shifts": _hue_curve,
          "gram_matrices": _gram_matrices}

def plot(groups, path, panels, cols, title):
    """Draw the named PANELS for groups = [(label, [metrics, ...]), ...],
    `cols` a row. Colours name the groups; the first panel's legend says which is which."""
    from matplotlib.figure import Figure        # no pyplot: no global state, no display
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows), layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, panels):
        PANELS[name](ax, groups)
    axes.flat[0].legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)

def run_title(m):
    c = m["config"]
    subset = f" ({c['train_subset']} images)" if c["train_subset"] else ""
    return (f"{c['arch']} | {c['dataset']} {c['image_size']}px{subset} | {c['epochs']} epochs, "
            f"batch {c['batch_size']} | {m['device']}")

# -------------------------------------------------------------------------------------
# 15. Other modes: --compare, --augmentations, --benchmark, --exercise
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
VARIANT_KEYS = ("contrastive", "lam", "pair_per", "group_size", "temperature", "arch",
                "dataset", "image_size", "train_subset", "epochs", "batch_size", "optimizer",
                "lr", "precision")

def group_summary(ms):
    return {k: "-" if mean is None else f"{mean:.4g}" + (f" +- {sd:.1g}" if len(ms) > 1 else "")
            for k, (mean, sd) in ((k, _stats([summary(m)[k] for m in ms])) for k in summary(ms[0]))}

def recorded(panel, runs):
    """Whether any run recorded what the panel draws (older records lack the geometry)."""
    if panel in CURVES:
        return any(_value(r, k) is not None for m in runs for r in m["epochs"]
                   for k in CURVES[panel][1])
    key = {"residuals": "identity_residual", "families": "by_family", "hue_shifts": "hue_cosine",
           "gram_matrices": "gram_matrices"}[panel]
    return any((m.get("diagnostics") or {}).get(key) is not None for m in runs)

def read_record(folder):
    """A run folder's metrics.json, checked to be a record of care.py's: one line if not."""
    path = os.path.join(folder, "metrics.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:          # missing, unreadable, not JSON
        raise CareError(f"--compare {folder}: cannot read {path} ({_first_line(e)})") from None
    c, rows = (m.get("config"), m.get("epochs")) if isinstance(m, dict) else (None, None)
    if not (isinstance(c, dict) and rows and isinstance(rows, list) and all(
            isinstance(r, dict) for r in rows) and {"device", "wall_time_s"} <= m.keys() and {
            "method", "arch", "dataset", "image_size", "train_subset", "epochs", "batch_size"}
            <= c.keys()):
        raise CareError(f"--compare {folder}: {path} is no record of care.py's (its config, "
                        f"epochs, device or wall time missing)")
    return m

def compare(dirs, out):
    """--compare: runs grouped by setting, seeds pooled: out/compare.png and a mean +- sd table."""
    if len({os.path.realpath(d) for d in dirs}) < len(dirs):
        raise CareError("--compare lists a folder twice: its run would count as two seeds")
    runs = [read_record(d) for d in dirs]
    varying = [k for k in VARIANT_KEYS if len({str(m["config"].get(k)) for m in runs}) > 1]
    groups = {}
    for m in runs:
        c = m["config"]
        label = c["method"] + "".join(f" {k.replace('_', '-')}={c.get(k)}" for k in varying
                                      if k != "lam" or c["method"] == "care")
        groups.setdefault(label, []).append(m)
    groups = list(groups.items())
    panels = [p for p in ("knn", "info_nce", "alignment", "uniformity", "equivariance", "gram",
                          "procrustes", "angle", "hue", "hue_z", "colour", "residuals",
                          "families", "hue_shifts") if recorded(p, runs)]
    plot(groups, os.path.join(make_out(out), "compare.png"), panels, 5,
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
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 5.6), layout="tight")
    ax = fig.subplots()
    grid = torchvision.utils.make_grid(tiles, nrow=9, padding=1, pad_value=1)
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_xticks([2 * S, 7 * S], ["group 1", "group 2"])
    ax.set_yticks([(i + 0.5) * S for i in range(5)], list(rows), fontsize=11)
    ax.tick_params(length=0, labeltop=True, labelbottom=False)
    ax.spines[:].set_visible(False)
    fig.suptitle("t, t': drawn per image (InfoNCE)    a, a': drawn once per group of 4 "
                 "(equivariance loss)", fontsize=10)
    fig.savefig(os.path.join(cfg.out, "augmentations.png"), dpi=110)
    print(f"figure: {os.path.join(cfg.out, 'augmentations.png')}")

BENCH_WARMUP, BENCH_STEPS = 3, 10               # untimed and timed steps of each kind

def benchmark(cfg):
    """--benchmark: the training step timed against itself on ready-made views (bare: step /
    bare is what the batched augmentation adds) and in fp32, contiguous and eager (fp32:
    fp32 / step is what the speed settings buy here). figures/README.md, Speed."""
    device = setup(cfg)
    B, size = cfg.batch_size, cfg.image_size
    images = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, device=device)
    g = torch.Generator(device).manual_seed(cfg.seed)
    aug = augmenter(cfg, CIFAR10_MEAN, CIFAR10_STD)
    ready = aug(images.float() / 255, 1, g)

    def stepper(views=aug, fast=True, **change):   # a fresh network, optimizer and scaler
        c = argparse.Namespace(**{**vars(cfg), **change, "compile": cfg.compile and fast})
        machine = Machine(amp_dtype(cfg.precision if fast else "fp32", device), fast, device)
        model, net = build_model(c, device, machine)
        opt = make_optimizer(model, c, 1)[0]
        return lambda: train_step(net, opt, images, c, g, views, machine)

    kinds = {"care": stepper(method="care"), "simclr": stepper(method="simclr"),
             "bare": stepper(lambda x, n, generator: ready), "fp32": stepper(fast=False)}
    med = time_steps(kinds, device, BENCH_WARMUP, BENCH_STEPS)
    result = {**{f"{k}_step_s": t for k, t in med.items()},
              "overhead_ratio": med[cfg.method] / med["bare"],
              "care_simclr_ratio": med["care"] / med["simclr"],
              "speedup_vs_fp32": med["fp32"] / med[cfg.method],
              "images_per_s": B / med[cfg.method], "device": device_name(device),
              "precision": str(amp_dtype(cfg.precision, device)).removeprefix("torch."),
              "host_syncs": count_host_syncs(kinds["care"]) if device.type == "cuda" else None,
              "config": vars(cfg)}
    path = os.path.join(cfg.out, "benchmark.json")
    atomic_save(result, path)
    times = " | ".join(f"{k} step {t * 1e3:.1f} ms" for k, t in med.items())
    syncs = f" | host syncs in a step: {result['host_syncs']}" if device.type == "cuda" else ""
    print(f"benchmark: {cfg.arch}, batch {B} x {size}px, {result['device']}, "
          f"{result['precision']}, channels_last, {'compiled' if cfg.compile else 'eager'}; "
          f"median of {BENCH_STEPS} steps after {BENCH_WARMUP} warm-up\n  {times}\n  overhead "
          f"ratio {result['overhead_ratio']:.3f} | CARE / SimCLR step "
          f"{result['care_simclr_ratio']:.2f} | speedup vs fp32 {result['speedup_vs_fp32']:.2f}"
          f" | {result['images_per_s']:.0f} images/s{syncs} -> {path}")
    return result

def time_steps(kinds, device, warmup, steps):
    """Median seconds per step of each kind, the kinds interleaved: equal conditions."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in kinds}
    for _ in range(warmup + steps):
        for kind, step in kinds.items():
            sync()
            t = time.perf_counter()
            step()
            sync()
            times[kind].append(time.perf_counter() - t)
    return {k: sorted(v[warmup:])[steps // 2] for k, v in times.items()}

def count_host_syncs(step):
    """Run one step with CUDA's sync debug mode on; count the host syncs it reports."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in seen)

# The course: each exercise hands out these functions, and builds on those exercises (a
# function left unwritten also fails the exercises that call it). README.md, "Using care.py
# in a course".
EXERCISES = {
    "info_nce": (("similarity_logits", "info_nce"), ()),
    "alignment_uniformity": (("alignment_uniformity",), ("info_nce",)),
    "equivariance_loss": (("equivariance_loss",), ()),
    "augment": (("augment",), ("adjust_hue", "gaussian_blur")),
    "adjust_hue": (("adjust_hue",), ()), "gaussian_blur": (("gaussian_blur",), ()),
    "objective": (("objective",), ("info_nce", "alignment_uniformity", "equivariance_loss")),
    "knn_top1": (("knn_top1",), ()), "linear_probe": (("linear_probe", "fit_linear"), ()),
    "residuals": (("procrustes", "residuals"), ()),
    "rotation_angle_deg": (("rotation_angle_deg",), ()),
    "colour_probe": (("colour_probe",), ("linear_probe",))}

def grader(name):
    """The command, typed in the student's folder, that runs exercise `name`'s test class."""
    return f"python -m pytest -q test_care.py::Test{name.title().replace('_', '')}"

def write_exercise(names, out):
    """--exercise: out/care.py, in which each named exercise's functions keep signature,
    docstring and every comment, and their bodies raise NotImplementedError naming the
    exercise and its grader; everything else is byte-identical. And out/test_care.py."""
    names = list(dict.fromkeys(names))                          # each name once
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise CareError(f"no exercise {unknown[0]!r}; the exercises: {', '.join(EXERCISES)}")
    here, target = os.path.dirname(os.path.abspath(__file__)), os.path.join(out, "care.py")
    if os.path.exists(target):
        raise CareError(f"{target} exists: choose another --out, or remove it first")
    make_out(out)
    with open(os.path.join(here, "care.py")) as f:
        lines = f.read().split("\n")
    exercise_of = {f: n for n in names for f in EXERCISES[n][0]}
    for node in reversed(ast.parse("\n".join(lines)).body):       # bottom up: lines stay put
        if isinstance(node, ast.FunctionDef) and node.name in exercise_of:
            name, doc = exercise_of[node.name], node.body[0]     # every exercise has a docstring
            indent, body = " " * doc.col_offset, lines[doc.end_lineno:node.end_lineno]
            lines[doc.end_lineno:node.end_lineno] = [          # the hints stay, then the stub
                indent + line.strip() for line in body if line.strip().startswith("#")] + [
                f"{indent}raise NotImplementedError(\"exercise {name}: write {node.name}, then "
                f"grade it in this folder: {grader(name)}\")"]
    with open(target, "w") as f:
        f.write("\n".join(lines))
    shutil.copy(os.path.join(here, "test_care.py"), out)
    print(f"{target}: " + "; ".join(f"{n} to write" for n in names) + "\ngrade each with:\n"
          + "\n".join(f"  cd {shlex.quote(out)} && {grader(n)}" for n in names))

# -------------------------------------------------------------------------------------
# 16. The command line: flags from SETTINGS, the recipe, resume, checks, errors
class Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line, no usage block
        self.exit(2, f"care.py: error: {message} (see python care.py --help)\n")

def _flag(name, value=None):
    """A setting as its flag, --group-size 16; a recipe-only one as group_size=16."""
    value = format(value, "g") if isinstance(value, float) else value
    if not SETTINGS[name].flag:
        return f"{name}={value}"
    return f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}")

def build_parser():
    """The flags of SETTINGS. What it parses holds only the flags typed (no defaults)."""
    p = Parser(description="CARE / SimCLR self-supervised training, evaluation and figures in "
               "one file. Several processes: torchrun --nproc_per_node=N care.py ...",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS, epilog="how each --dataset's recipe "
               "differs from the defaults above (the authors' scripts):\n" + "\n".join(
                   f"  {name:<12}" + (" ".join(_flag(k, v) for k, v in r.items()) or "-")
                   for name, r in RECIPES.items()))
    titles = {"run": "the run (a resume keeps these, but --epochs)", "kept": "evaluation "
              "and paths (a resume keeps these unless typed)", "machine": "this machine",
              "mode": "other modes"}
    groups = {kind: p.add_argument_group(title) for kind, title in titles.items()}
    groups["epochs"] = groups["run"]
    by_dataset = {k for r in RECIPES.values() for k in r}
    for name, s in SETTINGS.items():
        if not s.flag:
            continue
        shown = not (s.default is None or s.default is False or s.default == ())
        help = s.help + (f" (default: {s.default}{', by --dataset' * (name in by_dataset)})"
                         if shown else "")
        if isinstance(s.default, bool):
            kw = dict(action="store_true")
        elif isinstance(s.default, tuple):
            kw = dict(nargs="+", metavar="DIR" if name == "compare" else "NAME")
        else:
            kw = dict(type=str if s.default is None else type(s.default), choices=s.choices,
                      metavar="PATH" if s.default is None else None)
        groups[s.kind].add_argument(_flag(name), help=help, **kw)
    return p

def command_line(cfg):
    """The flags that repeat this run's training, then this machine's."""
    def flags(kinds):
        return " ".join(_flag(k, None if s.default is False else getattr(cfg, k))
                        for k, s in SETTINGS.items() if s.kind in kinds and s.flag
                        and getattr(cfg, k) is not False)
    return f"{flags(('run', 'epochs'))} | this machine: {flags(('machine',))}"

def configure(typed):
    """All settings from the typed flags; resuming, the rest from the checkpoint, else from
    the dataset's recipe, else SETTINGS. Validated: returns (cfg, checkpoint or None)."""
    cfg, ckpt = {k: s.default for k, s in SETTINGS.items()}, None
    if typed.get("eval_only") and not typed.get("resume"):
        raise CareError("--eval-only needs --resume PATH (the checkpoint to evaluate)")
    if typed.get("resume"):
        ckpt = load_checkpoint(typed["resume"])
        saved = {k: v for k, v in ckpt["config"].items()
                 if k in SETTINGS and SETTINGS[k].kind in ("run", "epochs", "kept")}
        for k, v in typed.items():
            if SETTINGS[k].kind == "run" and k in saved and v != saved[k]:
                raise CareError(f"--resume {typed['resume']} was trained with {_flag(k, saved[k])},"
                                f" not {v}: drop {_flag(k)} or start a new run")
        if typed.get("epochs", ckpt["epoch"]) < ckpt["epoch"]:
            raise CareError(f"--epochs {typed['epochs']}: this run has trained {ckpt['epoch']} "
                            f"epochs; to evaluate it, drop --epochs and add --eval-only")
        if saved["lr_schedule"] == "cosine" and typed.get("epochs") not in (None, saved["epochs"]):
            raise CareError(f"--epochs {typed['epochs']}: this run's cosine schedule ends at "
                            f"epoch {saved['epochs']}, and another length would make the "
                            f"learning rate jump; start a new run instead")
        cfg.update(RECIPES[saved["dataset"]])
        cfg.update(saved, out=typed.get("out", os.path.dirname(typed["resume"]) or "."))
        if "data_root" not in typed and not os.path.exists(cfg["data_root"]):
            raise CareError(f"--resume: the run read its data from {cfg['data_root']}, not there "
                            f"from here: run from the folder it started in, or give --data-root")
    else:
        cfg.update(RECIPES[typed.get("dataset", cfg["dataset"])])
    cfg = argparse.Namespace(**{**cfg, **typed})
    if cfg.method == "simclr":
        cfg.lam = 0.0
    validate(cfg)
    mode = "benchmark" if cfg.benchmark else "augmentations" if cfg.augmentations else None
    cfg.out = cfg.out or os.path.join("runs", mode or f"{cfg.method}-{cfg.dataset}")
    existing = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.exists(existing) and not mode and not (
            cfg.resume and os.path.samefile(existing, cfg.resume)):
        raise CareError(f"{cfg.out} already holds a run: continue it with --resume {existing}, "
                        f"or choose another --out")
    make_out(cfg.out)
    return cfg, ckpt

def make_out(path):
    """Make the output folder and check that a file can be written in it, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:                        # a file of that name, no permission, too long
        raise CareError(f"--out {path}: cannot write there ({e.strerror or e}); choose another "
                        f"--out") from None
    return path

# The range of each number (all finite): (low, high, whether it must be above low).
LIMITS = dict(group_size=(1, math.inf, False), batch_size=(2, math.inf, False),
              epochs=(0, math.inf, False), knn_every=(1, math.inf, False),
              train_subset=(0, math.inf, False), image_size=(4, 1024, False),
              seed=(0, 2**63 - 1, False), lam=(0, math.inf, False), temperature=(0, math.inf, True),
              lr=(0, math.inf, True), weight_decay=(0, math.inf, False))
LIMIT_WHY = {"image_size": " (care.py holds every image on the device as uint8, 3 S^2 bytes: at "
             "1024 px 3 MB an image, 157 GB for 50,000)"}

def torchrun():
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and {
        "RANK", "LOCAL_RANK", "MASTER_ADDR"} <= os.environ.keys()

def validate(cfg):
    """Every check that needs no data: a bad flag fails here, before any work is done."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    b, device = cfg.batch_size // world, pick_device(cfg.device)  # b: one process's share
    checks = [(not (math.isfinite(v := getattr(cfg, k)) and (v > low if above else v >= low)
                    and v <= high), f"--{k.replace('_', '-')} must be {'>' if above else '>='} "
               f"{low}{f' and <= {high}' * (high < math.inf)}, got {v}{LIMIT_WHY.get(k, '')}")
              for k, (low, high, above) in LIMITS.items()]     # nan and inf fail here too
    checks += [
        (cfg.batch_size % world, f"--batch-size {cfg.batch_size} is not divisible by the "
                                 f"{world} processes"),
        (b < 2, f"--batch-size {cfg.batch_size} leaves {b} image per process; BatchNorm "
                f"needs at least 2"),
        ((cfg.method == "care" or cfg.benchmark) and cfg.group_size >= 1 and b % cfg.group_size,
         f"--batch-size {cfg.batch_size} is not a multiple of --group-size {cfg.group_size}"
         + (f" on each of {world} processes ({b} images each)" if world > 1 else "")),
        (cfg.blur_kernel % 2 == 0 or not 1 <= cfg.blur_kernel < 2 * cfg.image_size,
         f"the blur kernel ({cfg.blur_kernel}) must be odd and smaller than twice "
         f"--image-size ({cfg.image_size})"),
        (not cfg.benchmark and os.path.isfile(cfg.data_root),
         f"--data-root {cfg.data_root} is a file; it must be a folder"),
        (cfg.dataset in FOLDERS and not cfg.benchmark and not os.path.isdir(cfg.data_root),
         f"--data-root {cfg.data_root} does not exist (--dataset {cfg.dataset} needs "
         f"DIR/train/<class>/ and DIR/test/<class>/)"),
        (world > 1 and not torchrun(), f"WORLD_SIZE is {world}, but RANK, LOCAL_RANK or "
         f"MASTER_ADDR is not set: start the processes with torchrun, or unset WORLD_SIZE"),
        (world > 1 and (cfg.benchmark or cfg.augmentations),
         "--benchmark and --augmentations run in one process: start them with python, "
         "not torchrun"),
        (cfg.sync_bn and device.type != "cuda",
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

def _out_of_memory(e):
    """An out-of-memory error (the GPU's, or the host's allocator's), also when torch.compile
    wraps it in its own exception."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e):
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "inner_exception", None)
    return False

def main(argv=None):
    typed = vars(build_parser().parse_args(argv))
    previous = signal.getsignal(signal.SIGTERM)         # launch makes it Ctrl-C in training
    rank = f"process {os.environ['RANK']}: " if torchrun() else ""     # which process says it
    try:
        if typed.get("compare"):
            return compare(typed["compare"], typed.get("out", os.path.join("runs", "compare")))
        if typed.get("exercise"):
            return write_exercise(typed["exercise"], typed.get("out", "course"))
        cfg, ckpt = configure(typed)
        if cfg.augmentations:
            return draw_augmentations(cfg)
        return benchmark(cfg) if cfg.benchmark else launch(cfg, ckpt)
    except KeyboardInterrupt:                   # outside the training loop: nothing to keep
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)
    except Exception as e:
        if isinstance(e, OSError):              # a file or folder that cannot be used
            e = CareError(f"{e.filename or ''}: {e.strerror or e}", code=1)
        elif not isinstance(e, CareError):
            if not _out_of_memory(e):
                raise
            e = CareError("out of memory: lower --batch-size or --image-size, use --train-subset,"
                          " or a smaller --arch", code=1)
        print(f"care.py: error: {rank}{e}", file=sys.stderr)
        raise SystemExit(e.code)
    finally:
        signal.signal(signal.SIGTERM, previous)
        while CLAIMED:
            CLAIMED.pop().close()
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
