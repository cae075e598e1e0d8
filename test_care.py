"""The executable spec of care.py, and the grader of the course's exercises.

    python -m pytest -q test_care.py                     # everything: CPU, no network
    python -m pytest -q test_care.py::TestInfoNce        # one exercise (care.grader)

The first part holds one class per exercise of care.EXERCISES: each tests only its own
functions, each test checks one property that the function's docstring states, and each
failure says which property failed, on what input and where. Some hold a second
implementation to compare with (the naive loops below: naive_info_nce, naive_halves,
naive_equivariance_loss) or torchvision's reference; README.md ("Using care.py in a
course") says what that gives away. The second part is the spec of the rest: training,
runs end to end, resume, torchrun, figures and every bad input.
"""
import argparse
import ast
import functools
import inspect
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torchvision.transforms.functional as TF
from torch.optim.optimizer import register_optimizer_step_pre_hook

import care

HERE = os.path.dirname(os.path.abspath(care.__file__))
F = torch.nn.functional


def random_orthogonal(d, generator=None):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()      # Haar-distributed


def unit(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, d, generator=g), dim=1)


def crowded(B=8, d=3):
    """B unit vectors, the second a near copy of the first (cosine above 0.99): at a
    temperature of 0.01 their similarity logit is about 99, and exp(99) overflows float32."""
    z = unit(B, d)
    z[1] = F.normalize(z[0] + 0.05 * z[2], dim=0)
    return z


def images(B=8, H=16, seed=0):
    return torch.rand(B, 3, H, H, generator=torch.Generator().manual_seed(seed))


def as64(v):
    """A number, a tensor or a (nested) list of them, as a float64 tensor."""
    if isinstance(v, (list, tuple)):
        return torch.stack([as64(x) for x in v])
    return torch.as_tensor(v).detach().double()


def close(got, want, what, atol=1e-5, rtol=1e-5):
    """got == want within atol + rtol |want| everywhere, or a failure that says what was
    checked, how many values differ, the first index where they do (with both values) and
    the largest difference."""
    got, want = as64(got), as64(want)
    assert got.shape == want.shape, (
        f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    bad = ~torch.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        index = lambda flat: tuple(int(i) for i in torch.unravel_index(flat, got.shape))
        gap = (got - want).abs().nan_to_num(float("inf"))
        first, worst = index(bad.flatten().nonzero()[0, 0]), index(gap.flatten().argmax())
        where = lambda i: f" at index {list(i)}" if i else ""
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values differ; the first{where(first)}: "
            f"expected {want[first].item():.6g}, got {got[first].item():.6g}; the largest "
            f"difference {gap[worst].item():.3g}{where(worst)}")


def gradient(z, name):
    """z.grad, or a failure saying that no gradient reached z."""
    assert z.grad is not None, (
        f"no gradient reached {name}: keep the result a tensor computed from it (no .item(), "
        f".detach(), torch.tensor([...]) or torch.no_grad)")
    return z.grad


def raises(error, what, function, *args, **kwargs):
    """function(*args, **kwargs) must raise `error`: a failure names the input if it does not."""
    try:
        function(*args, **kwargs)
    except error:
        return
    raise AssertionError(f"{what}: expected {error.__name__}, nothing was raised")


def cfg_for(**change):
    """The settings of a default run (CPU), with some changed: what train_step reads."""
    return argparse.Namespace(**{**{k: s.default for k, s in care.SETTINGS.items()},
                                 "device": "cpu", **change})


class Grader:
    """The base of each exercise's class. An error raised while a test runs the student's
    code (a shape that does not fit, an index out of range, an argument missing) fails that
    test as the property it checks, with the line of care.py that raised it; a stub's
    NotImplementedError and the test's own assertions pass through unchanged."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, test in list(vars(cls).items()):
            if name.startswith("test_") and callable(test):
                setattr(cls, name, reported(test))


def reported(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except (AssertionError, NotImplementedError):
            raise
        except Exception as e:
            frames = traceback.extract_tb(e.__traceback__)
            at = ([f for f in frames if os.path.basename(f.filename) == "care.py"] or frames)[-1]
            failure = (f"{test.__name__.removeprefix('test_').replace('_', ' ')}: "
                       f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]} (at "
                       f"{os.path.basename(at.filename)} line {at.lineno}: {at.line})")
        pytest.fail(failure, pytrace=False)             # outside except: no chained traceback
    return run


# Second implementations, written from the definitions as loops over views and pairs; in
# float64 they stay exact where float32 overflows, and autograd differentiates them.
def naive_info_nce(z1, z2, tau):
    z = torch.cat([z1, z2])
    B, losses = z1.shape[0], []
    for i in range(2 * B):
        p = (i + B) % (2 * B)
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in range(2 * B) if k != i)
        losses.append(-torch.log(torch.exp(z[i] @ z[p] / tau) / den))
    return torch.stack(losses).mean()


def naive_halves(z1, z2, tau):
    """alignment, uniformity and the remainder, view by view, from the definitions."""
    z = torch.cat([z1, z2])
    B, align, unif, rest = z1.shape[0], [], [], []
    for i in range(2 * B):
        p = (i + B) % (2 * B)
        s = z[i] @ z[p] / tau
        N = sum(torch.exp(z[i] @ z[k] / tau) for k in range(2 * B) if k not in (i, p))
        align.append(-s), unif.append(torch.log(N)), rest.append(torch.log(1 + torch.exp(s) / N))
    return [torch.stack(v).mean() for v in (align, unif, rest)]


def naive_equivariance_loss(z1, z2, n):
    groups, total = z1.shape[0] // n, 0.0
    for k in range(groups):
        a, b = z1[k * n:(k + 1) * n], z2[k * n:(k + 1) * n]
        s = sum((a[i] @ a[j] - b[i] @ b[j]) ** 2 for i in range(n) for j in range(n) if i != j)
        total = total + 2 / n * s
    return total / groups


def leaves(*tensors):
    """float64 copies that autograd tracks: the inputs of a second implementation."""
    return [t.detach().double().requires_grad_() for t in tensors]


def gradient_matches(loss, naive, n, name):
    """loss(z1, z2) of n unit views each must be a 0-d tensor whose gradient reaches both
    views and equals the gradient of naive, the loop differentiated in float64."""
    z1, z2 = unit(n, 4, 0).requires_grad_(), unit(n, 4, 1).requires_grad_()
    value = loss(z1, z2)
    assert torch.is_tensor(value) and value.dim() == 0 and value.requires_grad, (
        f"{name} must return a 0-d tensor that carries the gradient, got {value!r}")
    value.backward()
    a, b = leaves(z1, z2)
    naive(a, b).backward()
    for z, ref, view in ((z1, a, "z1"), (z2, b, "z2")):
        close(gradient(z, view), ref.grad, f"d {name} / d {view}, against the loop's gradient")


# =====================================================================================
# Part 1: the course. One class per exercise; `python care.py --exercise NAME` hands out
# a copy of care.py with that exercise's functions to write.
# =====================================================================================
class TestInfoNce(Grader):
    """similarity_logits and info_nce: NT-Xent as a cross-entropy over masked logits."""

    def test_logits_mask_the_diagonal_and_pair_each_view_with_its_partner(self):
        z1, z2 = unit(3, 4, 0), unit(3, 4, 1)
        logits, partner = care.similarity_logits(z1, z2, 0.5)
        z, off = torch.cat([z1, z2]), ~torch.eye(6, dtype=torch.bool)
        assert logits.shape == (6, 6), (
            f"3 images give 2B = 6 views: logits (6, 6), got {tuple(logits.shape)}")
        assert (logits.diagonal() == float("-inf")).all(), (
            "a view is no candidate of its own: the diagonal must be -inf")
        close(logits[off], (z @ z.T / 0.5)[off],
              "logits[i, k] = <z_i, z_k> / tau off the diagonal (tau = 0.5)")
        assert torch.as_tensor(partner).tolist() == [3, 4, 5, 0, 1, 2], (
            f"with B = 3, view i's positive is p(i) = (i + 3) mod 6, got {partner}")

    def test_a_value_worked_out_by_hand(self):
        # B = 2 images in d = 2: z1 = z2 = [[1, 0], [0, 1]], so each view equals its partner
        # and is orthogonal to both views of the other image. View 0 = [1, 0] has three
        # candidates: its partner (similarity 1) and two others (similarity 0). At tau = 1
        #     l_0 = -log(e^1 / (e^0 + e^1 + e^0)) = log(2 + e) - 1 = 0.55144,
        # and by symmetry so is every l_i: info_nce = 0.55144. At tau = 0.5 the similarities
        # double (1/tau, once): log(2 + e^2) - 2 = 0.23950.
        z = torch.eye(2)
        close(care.info_nce(z, z, 1.0), math.log(2 + math.e) - 1,
              "info_nce(I, I, tau=1), worked out in the comment")
        close(care.info_nce(z, z, 0.5), math.log(2 + math.e ** 2) - 2,
              "info_nce(I, I, tau=0.5): divide by tau once")

    def test_matches_the_definition_view_by_view(self):
        z1, z2 = unit(6, 4, 0), unit(6, 4, 1)
        for tau in (0.1, 0.5, 1.0):
            close(care.info_nce(z1, z2, tau), naive_info_nce(z1, z2, tau),
                  f"info_nce of 6 random pairs (tau={tau}), against the loop over all 12 anchors")

    @pytest.mark.parametrize("tau", [0.01, 0.02, 0.05])
    def test_exact_at_small_temperatures(self, tau):
        # At tau = 0.01 a logit reaches 1 / 0.01 = 100, and exp(100) = 2.7e43 is past
        # float32's largest number (3.4e38): exp, then log, gives inf / inf = nan. The
        # softmax must be taken in log-sum-exp form. The loop in float64 is the reference.
        z = crowded()
        for z2, views in ((z, "aligned views (z2 = z1)"), (-z, "opposite views (z2 = -z1)")):
            close(care.info_nce(z, z2, tau), naive_info_nce(z.double(), z2.double(), tau),
                  f"info_nce at tau = {tau}, {views}, against the definition in float64",
                  atol=1e-4, rtol=1e-4)

    def test_a_tensor_that_carries_the_gradient_to_both_views(self):
        gradient_matches(lambda z1, z2: care.info_nce(z1, z2, 0.5),
                         lambda z1, z2: naive_info_nce(z1, z2, 0.5), 6, "info_nce")

    def test_float32_from_bfloat16_views(self):
        # bfloat16 keeps 8 bits of mantissa: a product taken in it is off by about 0.03
        # here (tau = 0.1). The views are converted to float32 first, then multiplied.
        z1, z2 = unit(16, 16, 0).bfloat16(), unit(16, 16, 1).bfloat16()
        logits, _ = care.similarity_logits(z1, z2, 0.1)
        assert logits.dtype == torch.float32, f"logits in float32, got {logits.dtype}"
        z, off = torch.cat([z1, z2]).double(), ~torch.eye(32, dtype=torch.bool)
        close(logits[off], (z @ z.T / 0.1)[off],
              "logits of bfloat16 views, converted to float32 before the products", atol=1e-4)
        loss = care.info_nce(z1, z2, 0.1)
        assert loss.dtype == torch.float32, f"info_nce in float32, got {loss.dtype}"
        close(loss, naive_info_nce(z1.double(), z2.double(), 0.1),
              "info_nce of bfloat16 views, in float32", atol=1e-4)

    def test_symmetric_in_its_views_and_blind_to_a_rotation_of_both(self):
        z1, z2, Q = unit(16, 8, 0), unit(16, 8, 1), random_orthogonal(8)
        loss = care.info_nce(z1, z2, 0.5)
        close(care.info_nce(z2, z1, 0.5), loss,
              "info_nce(z2, z1) = info_nce(z1, z2): both views are anchors")
        close(care.info_nce(z1 @ Q.T, z2 @ Q.T, 0.5), loss,
              "info_nce after rotating both views by one Q")

    def test_lower_when_the_views_agree(self):
        z1 = unit(64, 16, 0)
        aligned = care.info_nce(z1, z1, 0.5)
        noisy = care.info_nce(z1, F.normalize(z1 + 0.3 * unit(64, 16, 2)), 0.5)
        unrelated = care.info_nce(z1, unit(64, 16, 1), 0.5)
        assert aligned < noisy < unrelated, (
            f"identical, noisy and unrelated partners should score in that order: "
            f"{aligned:.3f} < {noisy:.3f} < {unrelated:.3f}")


class TestAlignmentUniformity(Grader):
    """alignment_uniformity: InfoNCE's two halves (care.py, the comment above it)."""

    def test_a_value_worked_out_by_hand(self):
        # The four views of TestInfoNce: every positive has similarity 1, and every view has
        # two negatives of similarity 0. At tau = 1: alignment = mean_i(-s_i) = -1, and
        # uniformity = mean_i log N_i = log(e^0 + e^0) = log 2. At tau = 0.5 the positive's
        # logit doubles (alignment -2) while e^0 stays 1 (uniformity log 2).
        z = torch.eye(2)
        for tau, align in ((1.0, -1.0), (0.5, -2.0)):
            a, u = care.alignment_uniformity(z, z, tau)
            close(a, align, f"alignment(I, I, tau={tau}) = -1/tau, worked out in the comment")
            close(u, math.log(2),
                  f"uniformity(I, I, tau={tau}) = log 2: the negatives only, positive left out")

    def test_matches_the_definitions_view_by_view_and_adds_up_to_info_nce(self):
        z1, z2 = unit(6, 4, 0), unit(6, 4, 1)
        for tau in (0.1, 0.5):
            align, unif = care.alignment_uniformity(z1, z2, tau)
            n_align, n_unif, rest = naive_halves(z1, z2, tau)
            close(align, n_align, f"alignment of 6 random pairs (tau={tau}), against the loop")
            close(unif, n_unif, f"uniformity of 6 random pairs (tau={tau}), against the loop")
            close(align + unif + rest, naive_info_nce(z1, z2, tau),
                  "alignment + uniformity + mean log(1 + e^s_i / N_i) must be info_nce")

    @pytest.mark.parametrize("tau", [0.01, 0.02, 0.05])
    def test_exact_at_small_temperatures(self, tau):
        # Two views almost alike make a negative's logit about 99 at tau = 0.01: summing
        # exp of the logits overflows float32 (TestInfoNce); take the log-sum-exp instead.
        z = crowded()
        for z2, views in ((z, "aligned views (z2 = z1)"), (-z, "opposite views (z2 = -z1)")):
            align, unif = care.alignment_uniformity(z, z2, tau)
            n_align, n_unif, _ = naive_halves(z.double(), z2.double(), tau)
            close(align, n_align, f"alignment at tau = {tau}, {views}, in float64", atol=1e-4,
                  rtol=1e-4)
            close(unif, n_unif, f"uniformity at tau = {tau}, {views}, in float64", atol=1e-4,
                  rtol=1e-4)

    def test_tensors_that_carry_the_gradient_to_both_views(self):
        z1, z2 = unit(6, 4, 0).requires_grad_(), unit(6, 4, 1).requires_grad_()
        halves = care.alignment_uniformity(z1, z2, 0.5)
        for h, name in zip(halves, ("alignment", "uniformity")):
            assert torch.is_tensor(h) and h.dim() == 0 and h.requires_grad, (
                f"{name} must be a 0-d tensor that carries the gradient, got {h!r}")
        (halves[0] + 2 * halves[1]).backward()
        a, b = leaves(z1, z2)
        n_align, n_unif, _ = naive_halves(a, b, 0.5)
        (n_align + 2 * n_unif).backward()
        close(gradient(z1, "z1"), a.grad, "d (alignment + 2 uniformity) / d z1, against the loop")
        close(gradient(z2, "z2"), b.grad, "d (alignment + 2 uniformity) / d z2, against the loop")

    def test_float32_from_bfloat16_views(self):
        z1, z2 = unit(16, 16, 0).bfloat16(), unit(16, 16, 1).bfloat16()
        align, unif = care.alignment_uniformity(z1, z2, 0.1)
        assert align.dtype == unif.dtype == torch.float32, (
            f"both halves in float32, got {align.dtype} and {unif.dtype}")
        n_align, n_unif, _ = naive_halves(z1.double(), z2.double(), 0.1)
        close(align, n_align, "alignment of bfloat16 views, in float32", atol=1e-4)
        close(unif, n_unif, "uniformity of bfloat16 views, in float32", atol=1e-4)

    def test_blind_to_a_rotation_of_both_views(self):
        z1, z2, Q = unit(16, 8, 0), unit(16, 8, 1), random_orthogonal(8)
        before, after = care.alignment_uniformity(z1, z2), care.alignment_uniformity(z1 @ Q.T, z2 @ Q.T)
        for a, b, name in zip(before, after, ("alignment", "uniformity")):
            close(b, a, f"{name} after rotating both views by one Q")


class TestEquivarianceLoss(Grader):
    """equivariance_loss: Gram matrices of each group, batched with one bmm."""

    def test_a_value_worked_out_by_hand(self):
        # One group of n = 2 in d = 2: Z = [[1, 0], [0, 1]], Z' = [[1, 0], [1, 0]]. The Gram
        # matrices are n x n, one entry per pair of images: G = Z Z^T = I and
        # G' = Z' Z'^T = [[1, 1], [1, 1]]. Off the diagonal they differ by 1, twice:
        # sum_{i != j} (G_ij - G'_ij)^2 = 2, times 2/n = 1, so the loss is 2.0. A second
        # group whose two views agree adds 0: over both groups the mean is 1.0.
        Z, Z2 = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        close(care.equivariance_loss(Z, Z2, 2), 2.0,
              "one group: Z = I, Z' = [[1, 0], [1, 0]], worked out in the comment")
        close(care.equivariance_loss(torch.cat([Z, Z]), torch.cat([Z2, Z]), 2), 1.0,
              "two groups, the second unchanged: the mean over groups")

    def test_zero_when_one_rotation_moves_the_group(self):
        z, R = unit(32, 8), random_orthogonal(8)
        close(care.equivariance_loss(z, z @ R.T, group_size=8), 0.0,
              "Z' = Z R^T for one orthogonal R: G' = G")

    def test_groups_are_consecutive_rows_each_with_its_own_rotation(self):
        z, n = unit(32, 8), 8
        z2 = torch.cat([z[k * n:(k + 1) * n] @ random_orthogonal(8).T for k in range(4)])
        close(care.equivariance_loss(z, z2, group_size=n), 0.0,
              "rows [8k, 8k + 8) each rotated by their own R_k: zero only if groups are "
              "consecutive rows")

    def test_positive_for_a_map_that_is_not_a_rotation(self):
        z = unit(32, 8)
        A = torch.eye(8) + 0.5 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
        loss = care.equivariance_loss(z, z @ A.T, group_size=8)
        assert loss > 0.1, (
            f"Z' = Z A^T with A far from orthogonal must cost something, got {loss:.4f}")
        z2 = F.normalize(z @ torch.diag(torch.linspace(0.2, 2, 8)), dim=1)
        loss = care.equivariance_loss(z, z2, group_size=8)
        assert loss > 1e-2, (
            f"a non-uniform scaling, renormalised, is no rotation either; got {loss:.4f}")

    def test_blind_to_a_rotation_of_both_views_and_to_reordering_a_group_in_both(self):
        z1, z2, n, Q = unit(32, 8, 0), unit(32, 8, 1), 8, random_orthogonal(8)
        before = care.equivariance_loss(z1, z2, n)
        close(care.equivariance_loss(z1 @ Q.T, z2 @ Q.T, n), before,
              "after rotating both views by one Q")
        perm = torch.cat([k * n + torch.randperm(n, generator=torch.Generator().manual_seed(k))
                          for k in range(4)])
        close(care.equivariance_loss(z1[perm], z2[perm], n), before,
              "after reordering each group the same way in both views")
        after = care.equivariance_loss(z1[perm], z2, n)
        assert not torch.allclose(after, before, atol=1e-3), (
            "image i of Z must pair with image i of Z': reordering one view only must change it")

    @pytest.mark.parametrize("n", [1, 2, 4, 12])
    def test_matches_the_definition_pair_by_pair(self, n):
        z1, z2 = torch.randn(12, 5), torch.randn(12, 5)     # not unit norm: the diagonal counts
        close(care.equivariance_loss(z1, z2, n), naive_equivariance_loss(z1, z2, n),
              f"12 rows in groups of {n}, not unit norm, against the loop over pairs i != j",
              atol=1e-4)

    def test_float32_from_bfloat16_views(self):
        # Gram entries taken in bfloat16 are off by about 1e-3 of the loss here: convert the
        # views to float32 first. The loop in float64 on the same bfloat16 numbers is exact.
        z1, z2 = unit(16, 16, 0).bfloat16(), unit(16, 16, 1).bfloat16()
        loss = care.equivariance_loss(z1, z2, 8)
        assert loss.dtype == torch.float32, f"the loss in float32, got {loss.dtype}"
        close(loss, naive_equivariance_loss(z1.double(), z2.double(), 8),
              "the loss of bfloat16 views, in float32", atol=0, rtol=2e-5)

    def test_a_tensor_that_carries_the_gradient_to_both_views(self):
        gradient_matches(lambda z1, z2: care.equivariance_loss(z1, z2, 4),
                         lambda z1, z2: naive_equivariance_loss(z1, z2, 4), 8,
                         "equivariance_loss")

    def test_a_group_size_that_does_not_divide_the_batch_is_a_value_error(self):
        for group_size in (4, 0):
            raises(ValueError, f"10 rows in groups of {group_size}", care.equivariance_loss,
                   unit(10, 4), unit(10, 4), group_size=group_size)


# u: one augmentation row by name (care.AUG_COLUMNS), the crop the whole image.
def aug_row(**values):
    u = torch.zeros(1, 1, care.N_UNIFORMS)
    u[..., care.AUG_COLUMNS["crop_area"]] = 1.0             # all of the image,
    u[..., care.AUG_COLUMNS["crop_aspect"]] = 0.5           # square: no crop at all
    for name in ("flip", "jitter", "grayscale", "blur"):
        u[..., care.AUG_COLUMNS[name]] = 0.9                # off, unless given
    for name, v in values.items():
        u[..., care.AUG_COLUMNS[name]] = torch.tensor(v)
    return u


def jittered(x, strengths):
    """torchvision's colour jitter at given strengths u: brightness, contrast and saturation
    by 0.6 + 0.8 u, then hue by -0.1 + 0.2 u, in this order."""
    b, c, s, h = strengths
    x = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 0.6 + 0.8 * b),
                                                0.6 + 0.8 * c), 0.6 + 0.8 * s)
    return TF.adjust_hue(x, -0.1 + 0.2 * h)


PLAIN = dict(mean=(0.0,) * 3, std=(1.0,) * 3)               # normalize() leaves x as it is
# Jitter strengths whose order matters: brightness 1.32, contrast 0.68, saturation 1.36,
# hue -0.06. Any other order of the four differs by at least 0.05 somewhere.
STRENGTHS = [0.9, 0.1, 0.95, 0.2]


class TestAugment(Grader):
    """augment: one parameter row per group, shared by the group's images."""

    def test_a_view_worked_out_by_hand(self):
        # A 2x2 image, left column red (1, 0, 0), right column blue (0, 0, 1); the crop the
        # whole image, flip and grayscale on. Grayscale's luma is 0.2989 R + 0.587 G + 0.114 B
        # (torchvision's): red turns 0.2989, blue 0.114; flipped, the left column is 0.114
        # and the right 0.2989 in every channel. Normalised with mean 0.1, std 0.5:
        # (0.114 - 0.1) / 0.5 = 0.028 and (0.2989 - 0.1) / 0.5 = 0.3978.
        x = torch.zeros(1, 3, 2, 2)
        x[0, 0, :, 0], x[0, 2, :, 1] = 1.0, 1.0
        got = care.augment(x, 1, u=aug_row(flip=0.1, grayscale=0.1), mean=(0.1,) * 3,
                           std=(0.5,) * 3)
        close(got, torch.tensor([0.028, 0.3978]).expand(1, 3, 2, 2),
              "red | blue, flipped, grey, normalised (mean 0.1, std 0.5): 0.028 | 0.3978")

    def test_identical_images_in_a_group_get_identical_views(self):
        x = images(2).repeat_interleave(4, 0)               # groups of 4 copies of one image
        v = care.augment(x, group_size=4, generator=torch.Generator().manual_seed(0))
        for k in range(2):
            assert torch.allclose(v[4 * k:4 * k + 4], v[4 * k:4 * k + 1].expand(4, -1, -1, -1)), (
                f"4 copies of one image in group {k} must get one view: one row of parameters "
                f"per group")

    def test_each_group_draws_its_own_parameters(self):
        x = images(1).expand(16, -1, -1, -1).contiguous()   # one image, 8 groups of 2
        v = care.augment(x, group_size=2, generator=torch.Generator().manual_seed(0))
        distinct = len({tuple(v[i].flatten()[:50].tolist()) for i in range(0, 16, 2)})
        assert distinct == 8, (
            f"one image in 8 groups gave {distinct} different views, not 8: one row per group")

    def test_group_size_one_gives_each_image_its_own_views_and_each_call_fresh_ones(self):
        x, g = images(1).expand(8, -1, -1, -1).contiguous(), torch.Generator().manual_seed(0)
        v = care.augment(x, group_size=1, generator=g)
        distinct = len({tuple(v[i].flatten()[:50].tolist()) for i in range(8)})
        assert distinct == 8, f"group_size=1: 8 copies gave {distinct} different views, not 8"
        assert not torch.allclose(v, care.augment(x, group_size=1, generator=g)), (
            "a second call must draw afresh")

    def test_the_generator_decides_and_shape_dtype_device_stay(self):
        x = images(6, H=12)
        v = care.augment(x, 3, torch.Generator().manual_seed(5))
        assert v.shape == x.shape and v.dtype == x.dtype and v.device == x.device, (
            f"views of (6, 3, 12, 12) float32 images keep shape, dtype and device: got "
            f"{tuple(v.shape)} {v.dtype} {v.device}")
        assert torch.equal(v, care.augment(x, 3, torch.Generator().manual_seed(5))), (
            "the same seeded generator must give the same views: draw with "
            "torch.rand(..., generator=generator)")

    def test_row_k_of_given_parameters_acts_on_group_k(self):
        x = images(4)
        u = torch.cat([aug_row(flip=0.1), aug_row(grayscale=0.1)])     # group 0 flips
        got = care.augment(x, 2, u=u, **PLAIN)
        close(got[:2], x[:2].flip(3), "group 0 (images 0, 1): row 0 of u, a flip")
        close(got[2:], TF.rgb_to_grayscale(x[2:], 3), "group 1 (images 2, 3): row 1, grayscale")

    def test_the_jitter_applies_brightness_contrast_saturation_hue_in_that_order(self):
        x = images(4)
        got = care.augment(x, 4, u=aug_row(jitter=0.1, jitter_strengths=STRENGTHS))
        close(got, TF.normalize(jittered(x, STRENGTHS), care.CIFAR10_MEAN, care.CIFAR10_STD),
              "jitter alone at strengths u = (0.9, 0.1, 0.95, 0.2): brightness 1.32, contrast "
              "0.68, saturation 1.36, hue -0.06, in that order, then normalize", atol=1e-4)

    @pytest.mark.parametrize("u", [0.0, 0.999])
    def test_each_strength_spans_its_range(self, u):
        # u = 0 gives the low end of each range: factors 0.6, hue -0.1, sigma 0.1; u = 0.999
        # nearly the high end: factors 1.3992, hue 0.0998, sigma 1.9981.
        x = images(4)
        got = care.augment(x, 4, u=aug_row(jitter=0.1, jitter_strengths=[u] * 4), **PLAIN)
        close(got, jittered(x, [u] * 4),
              f"jitter strengths u = {u}: factors 0.6 + 0.8 u, hue -0.1 + 0.2 u", atol=1e-4)
        sigma = 0.1 + 1.9 * u
        close(care.augment(x, 4, u=aug_row(blur=0.1, blur_sigma=u), **PLAIN),
              TF.gaussian_blur(x, [3, 3], [sigma, sigma]),
              f"blur strength u = {u}: sigma 0.1 + 1.9 u = {sigma:.4f}", atol=1e-4)

    @pytest.mark.parametrize("family,p", [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2),
                                          ("blur", 0.5)])
    def test_each_family_is_on_just_below_its_probability_and_off_just_above(self, family, p):
        x = images(4)
        applied = {"flip": lambda v: v.flip(3), "jitter": lambda v: jittered(v, STRENGTHS),
                   "grayscale": lambda v: TF.rgb_to_grayscale(v, 3),
                   "blur": lambda v: TF.gaussian_blur(v, [3, 3], [1.05, 1.05])}[family]
        for switch, on in ((p - 0.01, True), (p + 0.01, False)):
            u = aug_row(**{family: switch}, jitter_strengths=STRENGTHS, blur_sigma=0.5)
            close(care.augment(x, 4, u=u, **PLAIN), applied(x) if on else x,
                  f"{family} switch u = {switch:.2f}: {'on' if on else 'off'} (on when u < {p})",
                  atol=1e-4)

    def test_everything_on_in_the_documented_order_with_scale_min_and_blur_kernel(self):
        # A crop of a fifth of the image, off centre (a flip before it would crop the
        # mirrored image's other side), then flip, jitter, grayscale (after the jitter: its
        # hue turn changes the grey levels), blur with kernel 5 (not the default 3), and
        # normalize with the given statistics.
        x, mean, std = images(4), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
        u = aug_row(crop_area=0.0, crop_position=[0.2, 0.7], flip=0.1, jitter=0.1,
                    jitter_strengths=STRENGTHS, grayscale=0.1, blur=0.1, blur_sigma=0.5)
        got = care.augment(x, 4, u=u, mean=mean, std=std, scale_min=0.2, blur_kernel=5)
        p = {k: u[0, :, c].expand(4, -1) for k, c in care.AUG_COLUMNS.items()}
        want = care.random_resized_crop(x, p["crop_area"], p["crop_aspect"], p["crop_position"],
                                        scale=(0.2, 1.0)).flip(3)
        want = TF.rgb_to_grayscale(jittered(want, STRENGTHS), 3)
        want = TF.normalize(TF.gaussian_blur(want, [5, 5], [1.05, 1.05]), mean, std)
        close(got, want, "crop (scale_min 0.2), flip, jitter, grayscale, blur (kernel 5), "
              "normalize (mean (0.5, 0.4, 0.3), std (0.2, 0.25, 0.3)), in that order", atol=1e-4)

    def test_a_group_size_that_does_not_divide_the_batch_is_a_value_error(self):
        for group_size in (4, 0):
            raises(ValueError, f"10 images in groups of {group_size}", care.augment, images(10),
                   group_size)


class TestAdjustHue(Grader):
    """adjust_hue: rotate the hue of every pixel, one shift per image."""

    @pytest.mark.parametrize("shift", [0.1, -0.1, 0.25, 0.5])
    def test_matches_torchvision(self, shift):
        x = images(4)
        close(care.adjust_hue(x, torch.full((4,), shift)), TF.adjust_hue(x, shift),
              f"4 random images turned by {shift} of a turn, against torchvision")

    def test_values_worked_out_by_hand(self):
        # Pure red has hue 0. A third of a turn takes it to green, two thirds to blue, and
        # -1/6 to magenta (1, 0, 1). Grey has no hue (saturation 0): it stays grey.
        red, grey = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, 0.5, 0.5])
        x = torch.stack([red, red, red, grey]).view(4, 3, 1, 1)
        got = care.adjust_hue(x, torch.tensor([1 / 3, 2 / 3, -1 / 6, 0.3])).view(4, 3)
        want = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
        close(got, want, "red turned by 1/3, 2/3 and -1/6, grey by 0.3: green, blue, magenta, grey")

    def test_pixels_without_a_hue_stay_as_they_are(self):
        # Black has value 0, so its saturation c / v is 0 / 0; black, white and greys have
        # chroma c = 0, so their hue (g - b) / c is 0 / 0 too. Neither may become nan: the
        # pixels must come back unchanged.
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0])          # black, greys, white
        x = levels.view(1, 1, 2, 2).expand(2, 3, 2, 2).contiguous()
        got = care.adjust_hue(x, torch.tensor([0.3, -0.45]))
        close(got, x, "black (0, 0, 0), greys and white (1, 1, 1) turned by 0.3 and -0.45")

    def test_a_float_shift_turns_every_image(self):
        x = images(4)
        for shift in (0.25, -0.1):
            close(care.adjust_hue(x, shift), TF.adjust_hue(x, shift),
                  f"a float shift ({shift}) for the whole batch, against torchvision")

    def test_one_shift_per_image(self):
        x, shifts = images(4), [0.05, -0.2, 0.3, 0.5]
        got = care.adjust_hue(x, torch.tensor(shifts))
        for i, s in enumerate(shifts):
            close(got[i], TF.adjust_hue(x[i], s),
                  f"image {i} of the batch turned by its own shift {s}")

    def test_shifts_a_whole_turn_apart_agree(self):
        x = images(4)
        close(care.adjust_hue(x, torch.zeros(4)), x, "a shift of 0")
        close(care.adjust_hue(x, torch.ones(4)), x, "a shift of a full turn (1.0)")
        close(care.adjust_hue(x, torch.full((4,), 0.75)), TF.adjust_hue(x, -0.25),
              "a shift of 0.75 of a turn is one of -0.25")


class TestGaussianBlur(Grader):
    """gaussian_blur: one sigma per image, reflect padding, as torchvision's."""

    @pytest.mark.parametrize("kernel", [3, 5, 23])
    def test_matches_torchvision(self, kernel):
        x = images(4, H=32)
        for sigma in (0.1, 0.8, 2.0):
            close(care.gaussian_blur(x, torch.full((4,), sigma), kernel),
                  TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma]),
                  f"kernel {kernel}, sigma {sigma} on random 32x32 images, against torchvision")

    def test_images_that_are_not_square(self):
        x = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0))
        close(care.gaussian_blur(x, torch.tensor([0.7, 1.6]), 5),
              torch.stack([TF.gaussian_blur(x[i], [5, 5], [s, s])
                           for i, s in enumerate((0.7, 1.6))]),
              "12x20 images (H != W), kernel 5, sigmas 0.7 and 1.6, against torchvision")

    def test_one_sigma_per_image(self):
        x, sigmas = images(4, H=16), [0.3, 1.0, 1.7, 2.0]
        got = care.gaussian_blur(x, torch.tensor(sigmas), 5)
        for i, s in enumerate(sigmas):
            close(got[i], TF.gaussian_blur(x[i], [5, 5], [s, s]),
                  f"image {i} blurred with its own sigma {s}")

    def test_values_worked_out_by_hand(self):
        # Kernel 3, sigma 1: weights e^(-t^2 / 2) at t = -1, 0, 1, normalised to sum 1:
        # w = (0.27407, 0.45186, 0.27407). A single white pixel in a black 5x5 image spreads
        # into the outer product w w^T. An image whose two left columns are white: at
        # column 0, reflect padding mirrors column 1 (white) into the border, so the blur
        # keeps it at w0 + w1 + w2 = 1; zero padding would give w1 + w2 = 0.72593.
        w = torch.exp(-0.5 * torch.tensor([-1.0, 0.0, 1.0]) ** 2)
        w /= w.sum()
        dot = torch.zeros(1, 3, 5, 5)
        dot[..., 2, 2] = 1
        got = care.gaussian_blur(dot, torch.ones(1), 3)[0, 0, 1:4, 1:4]
        close(got, torch.outer(w, w), "a white pixel blurred (kernel 3, sigma 1): the kernel w w^T")
        edge = torch.zeros(1, 3, 5, 5)
        edge[..., :2] = 1
        close(care.gaussian_blur(edge, torch.ones(1), 3)[0, 0, :, 0], torch.ones(5),
              "the left column of [1, 1, 0, 0, 0] rows: reflect padding keeps it at 1")

    def test_a_constant_image_stays_constant(self):
        x = torch.full((2, 3, 8, 8), 0.7)
        close(care.gaussian_blur(x, torch.tensor([0.5, 2.0]), 5), x,
              "a constant image: the kernel must sum to 1")


class TestObjective(Grader):
    """objective: the four views' projections -> the terms CARE trains and records."""

    z = [unit(8, 4, seed) for seed in range(4)]            # z(t x), z(t' x), z(a x), z(a' x)

    def expected(self, z, tau=0.5, lam=0.03, n=4, contrastive="infonce", gather=lambda v: v):
        """TERMS from the loops: (loss, info_nce, alignment, uniformity, equivariance)."""
        z1, z2 = gather(z[0]), gather(z[1])
        nce, (align, unif, _) = naive_info_nce(z1, z2, tau), naive_halves(z1, z2, tau)
        equi = naive_equivariance_loss(z[2], z[3], n)
        return [(nce if contrastive == "infonce" else unif) + lam * equi, nce, align, unif, equi]

    def test_terms_worked_out_by_hand(self):
        # The views of the other classes' worked values: z(t x) = z(t' x) = I (TestInfoNce:
        # info_nce = log(2 + e^2) - 2 = 0.23950 at tau = 0.5; TestAlignmentUniformity:
        # alignment -2, uniformity log 2 = 0.69315) and z(a x) = I, z(a' x) = [[1, 0],
        # [1, 0]] in one group of 2 (TestEquivarianceLoss: 2.0). With lam = 0.5 the loss is
        # 0.23950 + 0.5 * 2.0 = 1.23950.
        I, Z2 = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        nce = math.log(2 + math.e ** 2) - 2
        close(care.objective([I, I, I, Z2], cfg_for(group_size=2, lam=0.5)),
              [nce + 1.0, nce, -2.0, math.log(2), 2.0],
              "TERMS (loss, info_nce, alignment, uniformity, equivariance) worked out above")

    def test_care_adds_lam_times_the_equivariance_loss_of_the_shared_views(self):
        close(care.objective(self.z, cfg_for(group_size=4, lam=0.5)),
              self.expected(self.z, lam=0.5),
              "TERMS (loss, info_nce, alignment, uniformity, equivariance): InfoNCE on z[0], z[1], "
              "the equivariance loss on z[2], z[3], lam = 0.5", atol=1e-4)

    def test_the_temperature_and_group_size_are_cfgs(self):
        close(care.objective(self.z, cfg_for(temperature=0.2, group_size=2)),
              self.expected(self.z, tau=0.2, n=2),
              "TERMS at cfg.temperature = 0.2 and cfg.group_size = 2", atol=1e-4)

    def test_care_records_its_equivariance_term_even_at_lam_zero(self):
        close(care.objective(self.z, cfg_for(group_size=4, lam=0.0)),
              self.expected(self.z, lam=0.0),
              "--method care --lam 0: loss = info_nce, and the equivariance term still recorded",
              atol=1e-4)

    def test_simclr_has_no_equivariance_term(self):
        terms = care.objective(self.z[:2], cfg_for(method="simclr", lam=0.0, group_size=4))
        close(terms[[0, 4]], [naive_info_nce(*self.z[:2], 0.5), 0.0],
              "--method simclr: loss = info_nce, and the equivariance term 0 (two views only)",
              atol=1e-4)

    def test_uniformity_replaces_info_nce_in_the_loss(self):
        close(care.objective(self.z, cfg_for(contrastive="uniformity", group_size=4, lam=0.5)),
              self.expected(self.z, lam=0.5, contrastive="uniformity"),
              "--contrastive uniformity: loss = uniformity + lam * equivariance", atol=1e-4)

    def test_the_gradient_of_the_loss_reaches_every_view(self):
        z = [v.clone().requires_grad_() for v in self.z]
        terms = care.objective(z, cfg_for(group_size=4, lam=0.5))
        assert torch.is_tensor(terms) and terms.requires_grad, (
            "the TERMS must be a tensor that carries the gradient (torch.stack, not "
            "torch.tensor([...]) or .item())")
        terms[0].backward()
        ref = leaves(*self.z)
        self.expected(ref, lam=0.5)[0].backward()
        for i, name in enumerate(("z(t x)", "z(t' x)", "z(a x)", "z(a' x)")):
            close(gradient(z[i], name), ref[i].grad,
                  f"d loss / d {name}, against the loops' gradient (lam = 0.5)", atol=1e-4)

    def test_infonce_and_its_halves_see_what_the_gather_brings(self):
        extra = unit(4, 4, 9)                           # as if another process held 4 views
        gather = lambda v: torch.cat([v, extra])
        close(care.objective(self.z, cfg_for(group_size=4), gather),
              self.expected(self.z, gather=gather),
              "TERMS under a gather: info_nce and both halves over gather(z[0]) and gather(z[1]),"
              " the equivariance loss over the local z[2], z[3]", atol=1e-4)

    def test_terms_are_float32_even_from_bfloat16_views(self):
        z = [v.bfloat16() for v in self.z]
        terms = care.objective(z, cfg_for(group_size=4))
        assert terms.dtype == torch.float32 and terms.shape == (5,), (
            f"the losses run in float32: 5 terms, got {terms.dtype} {tuple(terms.shape)}")
        close(terms, self.expected([v.double() for v in z]),
              "TERMS of bfloat16 views, in float32", atol=1e-4)


def four_clusters():
    """16-d features of 4 well-separated classes: 200 training and 40 test images, and the
    training labels shuffled (no signal left)."""
    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.randn(4, 16, generator=g)
    y_train, y_test = torch.arange(200) % 4, torch.arange(40) % 4
    x_train = centres[y_train] + torch.randn(200, 16, generator=g)
    x_test = centres[y_test] + torch.randn(40, 16, generator=g)
    return x_train, y_train, x_test, y_test, y_train[torch.randperm(200, generator=g)]


class TestKnnTop1(Grader):
    """knn_top1: the weighted kNN monitor."""

    # The query [1, 0] and three training images: a = [0.1, 0] of class 1 (cosine 1: its
    # length must not matter) and b, c = [0.6, +-0.8] of class 0 (cosine 0.6 each).
    train, labels = torch.tensor([[0.1, 0.0], [0.6, 0.8], [0.6, -0.8]]), torch.tensor([1, 0, 0])

    def test_a_vote_worked_out_by_hand(self):
        # With k = 3 and temperature 0.5 the votes are e^(1/0.5) = 7.39 for class 1 against
        # 2 e^(0.6/0.5) = 6.64 for class 0: class 1, though class 0 has the majority.
        got = care.knn_top1(self.train, self.labels, torch.tensor([[1.0, 0.0]]), torch.tensor([1]),
                            k=3, temperature=0.5)
        assert float(got) == 100.0, (
            f"weighted by exp(cosine / temperature), class 1 wins (7.39 > 6.64): got {got}%")

    def test_queries_of_any_length_and_the_temperature_count(self):
        # A query [0.1, 0] has the same cosines: class 1 still wins (a dot product would
        # give e^0.2 = 1.22 against 2 e^0.12 = 2.25). At temperature 2 the votes are
        # e^(1/2) = 1.65 against 2 e^(0.6/2) = 2.70: class 0 wins, and the answer 1 is wrong.
        for query, temperature, want in (([0.1, 0.0], 0.5, 100.0), ([1.0, 0.0], 2.0, 0.0)):
            got = care.knn_top1(self.train, self.labels, torch.tensor([query]), torch.tensor([1]),
                                k=3, temperature=temperature)
            assert float(got) == want, (
                f"query {query}, temperature {temperature}: expected {want}%, got {got}%")

    def test_only_the_k_nearest_vote(self):
        train = torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * 5)       # one near, five farther
        got = care.knn_top1(train, torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([[1.0, 0.3]]),
                            torch.tensor([0]), k=1)
        assert float(got) == 100.0, f"k = 1: only the nearest image votes (class 0), got {got}%"

    def test_k_is_at_most_the_number_of_training_images(self):
        got = care.knn_top1(self.train, self.labels, torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
        assert float(got) == 100.0, (
            f"k = 200 (the default) with 3 training images: all 3 vote, class 1 wins; got {got}%")

    def test_a_class_without_training_images(self):
        # Labels are class indices: here 0 and 2, class 1 has no training image. The vote
        # is the one worked out by hand above, with class 1 renamed 2.
        got = care.knn_top1(self.train, torch.tensor([2, 0, 0]), torch.tensor([[1.0, 0.0]]),
                            torch.tensor([2]), k=3)
        assert float(got) == 100.0, (
            f"training labels 2, 0, 0 (no class 1): class 2 wins the vote; got {got}%")

    def test_every_chunk_counts_and_the_percentage_is_not_rounded(self):
        # 40 clustered test images repeated to 1030 queries (more than one chunk of 1024),
        # the last 10 (in the second chunk) with a wrong label: 1020 / 1030 = 99.029%. And
        # 30 queries in chunks of 7, the last 2 wrong: 28 / 30 = 93.333%.
        x_train, y_train, x_test, y_test, _ = four_clusters()
        for n, chunk in ((1030, 1024), (30, 7)):
            queries, labels = x_test.repeat(26, 1)[:n], y_test.repeat(26)[:n].clone()
            wrong = 10 if n > 40 else 2
            labels[-wrong:] = (labels[-wrong:] + 1) % 4
            got = care.knn_top1(x_train, y_train, queries, labels, k=20, chunk=chunk)
            close(got, 100 * (n - wrong) / n, f"{n} queries in chunks of {chunk}, the last "
                  f"{wrong} wrong: top-1 {n - wrong} / {n}, in percent, not rounded")

    def test_separable_features_score_100_and_shuffled_labels_near_chance(self):
        x_train, y_train, x_test, y_test, shuffled = four_clusters()
        got = care.knn_top1(x_train, y_train, x_test, y_test, k=20)
        assert float(got) == 100.0, f"4 separated clusters: 100 (a percentage), got {got}"
        got = care.knn_top1(x_train, shuffled, x_test, y_test, k=20)
        assert got < 60, f"labels that carry no signal must score near chance (25%), got {got}%"


def offset_and_scaled(n, seed):
    """Two classes read from feature 0, whose spread is 1e-3 about 1000; feature 1 is noise
    of spread 1000 about -500. Only standardising each feature by both its mean and its std
    brings the signal within reach of a linear layer's few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    signal = (2.0 * y - 1) + 0.3 * torch.randn(n, generator=g)
    return torch.stack([1000 + 1e-3 * signal, -500 + 1e3 * torch.randn(n, generator=g)], 1), y


class Recorder:
    """Stands in for a function: records each call's arguments by name, returns `result`."""

    def __init__(self, function, result):
        self.signature, self.result, self.calls = inspect.signature(function), result, []

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self.calls.append(bound.arguments)
        return self.result


class TestLinearProbe(Grader):
    """linear_probe and fit_linear: the fast linear evaluation."""

    @staticmethod
    def clusters(n, seed=0):
        """One feature: class 0 near -1, class 1 near +1."""
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        return (2.0 * y - 1).view(-1, 1) + 0.1 * torch.randn(n, 1, generator=g), y

    def test_separable_features_score_100_and_shuffled_labels_near_chance(self):
        x_train, y_train, x_test, y_test, shuffled = four_clusters()
        got = care.linear_probe(x_train, y_train, x_test, y_test, epochs=300)
        assert float(got) == 100.0, f"4 separated clusters: expected 100 (a percentage), got {got}"
        got = care.linear_probe(x_train, shuffled, x_test, y_test, epochs=300)
        assert got < 60, (
            f"trained on labels without signal, tested on the test split: near 25%, got {got}")

    def test_the_percentage_is_not_rounded(self):
        # Three clear test images, one of them labelled against its side: 2 of 3 right,
        # 66.667%.
        x_train, y_train = self.clusters(200)
        x_test, y_test = torch.tensor([[-1.0], [1.0], [1.0]]), torch.tensor([0, 1, 0])
        got = care.linear_probe(x_train, y_train, x_test, y_test, epochs=20, batch_size=16, lr=0.05)
        close(got, 200 / 3, "3 test images, 2 on their class's side: 66.667%, not rounded")

    def test_standardised_with_the_training_splits_statistics(self):
        # One feature: class 0 near -1, class 1 near +1 in training. The test images all
        # lie near +1 and are class 1: standardised with the training split's mean and
        # spread they stay on class 1's side (100%); with the test split's own statistics
        # they would straddle zero (about 50%).
        x_train, y_train = self.clusters(200)
        x_test, y_test = self.clusters(40, seed=1)
        x_test, y_test = x_test.abs(), torch.ones(40, dtype=torch.long)
        got = care.linear_probe(x_train, y_train, x_test, y_test, epochs=20, batch_size=16, lr=0.05)
        assert float(got) == 100.0, (
            f"test features standardised with the training split's mean and std: 100%, got {got}")

    def test_each_feature_centred_and_scaled_by_its_own_mean_and_std(self):
        # offset_and_scaled: without the mean, feature 0 stays near 1e6 std units from 0;
        # without the std (or with one std for all features) its signal stays 1e-3 wide.
        # Each such probe scores near 50% (at most 60 over seeds 0-4), the right one 100%.
        x_train, y_train = offset_and_scaled(200, 0)
        x_test, y_test = offset_and_scaled(100, 1)
        got = care.linear_probe(x_train, y_train, x_test, y_test, epochs=20, batch_size=16, lr=0.05)
        assert got > 95, (
            f"features of means (1000, -500) and spreads (1e-3, 1e3), class in feature 0: each "
            f"feature standardised by the training split's own mean and std gives 100%, got {got}%")

    def test_a_standardisation_worked_out_by_hand(self, monkeypatch):
        # Training features 0, 2, 4: mean 2, standard deviation sqrt((4 + 0 + 4) / 2) = 2
        # (torch.std divides by n - 1), so they become -1, 0, 1; a test feature 6 becomes
        # (6 - 2) / 2 = 2, by the training split's statistics. fit_linear is recorded here,
        # not run.
        # A second feature, 5 for every image, has std 0: the 1e-6 added to the std keeps
        # it at (5 - 5) / 1e-6 = 0 instead of 0 / 0 = nan.
        fit = Recorder(care.fit_linear, 0.0)
        monkeypatch.setattr(care, "fit_linear", fit)
        care.linear_probe(torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]]),
                          torch.tensor([0, 0, 1]), torch.tensor([[6.0, 5.0]]), torch.tensor([1]))
        close(fit.calls[0]["epoch_features"](), [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]],
              "training features (0, 2, 4) and (5, 5, 5) standardised: (-1, 0, 1) and 0",
              atol=1e-5)
        close(fit.calls[0]["test_h"], [[2.0, 0.0]], "test features 6 and 5 standardised by the "
              "training split's means (2, 5) and stds (2, 0): 2 and 0", atol=1e-5)

    def test_fit_linear_gets_the_standardised_features_and_the_settings(self, monkeypatch):
        fit = Recorder(care.fit_linear, 42.0)
        monkeypatch.setattr(care, "fit_linear", fit)
        x_train, y_train = offset_and_scaled(200, 0)
        x_test, y_test = offset_and_scaled(100, 1)
        got = care.linear_probe(x_train, y_train, x_test, y_test, epochs=7, batch_size=16, lr=0.05,
                                seed=3)
        assert len(fit.calls) == 1 and float(got) == 42.0, (
            f"linear_probe must train with one call of fit_linear and return its accuracy: "
            f"{len(fit.calls)} calls, returned {got}")
        call = fit.calls[0]
        settings = {k: call[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "seed",
                                         "cosine")}
        assert settings == dict(epochs=7, batch_size=16, lr=0.05, weight_decay=0.0, seed=3,
                                cosine=True), f"fit_linear's settings: {settings}"
        mean, std = x_train.mean(0), x_train.std(0)
        close(call["epoch_features"](), (x_train - mean) / std, "the training features, "
              "standardised with the training split's per-feature mean and std", rtol=1e-2)
        close(call["test_h"], (x_test - mean) / std, "the test features, standardised with "
              "the training split's per-feature mean and std", rtol=1e-2, atol=1e-3)
        assert torch.equal(call["train_y"], y_train) and torch.equal(call["test_y"], y_test), (
            "fit_linear gets the labels of both splits as they are")

    def test_repeatable_for_a_seed_and_leaves_the_global_random_stream_alone(self):
        x, y = self.clusters(64)
        noisy = x + torch.randn(64, 1, generator=torch.Generator().manual_seed(3))
        before = torch.random.get_rng_state()
        a = care.linear_probe(noisy, y, noisy, y, epochs=5, seed=3)
        assert torch.equal(torch.random.get_rng_state(), before), (
            "the probe must not draw from the global stream")
        assert a == care.linear_probe(noisy, y, noisy, y, epochs=5, seed=3), (
            "the same seed must give the same accuracy")

    @staticmethod
    def batches(monkeypatch, seed, epochs=3, n=20, batch_size=8):
        """fit_linear on rows whose feature 0 is the row's number and feature 1 the count of
        epoch_features() calls so far; what the nn.Linear saw in training, batch by batch,
        and how often epoch_features() was called."""
        seen, calls, forward = [], [0], torch.nn.Linear.forward
        monkeypatch.setattr(torch.nn.Linear, "forward",
                            lambda layer, x: seen.append(x.detach().clone()) or forward(layer, x))

        def epoch_features():
            calls[0] += 1
            return torch.stack([torch.arange(n), torch.full((n,), calls[0])], 1).float()
        test_h = torch.full((4, 2), -1.0)                   # row -1: the test split
        care.fit_linear(epoch_features, torch.arange(n) % 2, test_h, torch.zeros(4).long(),
                        epochs=epochs, batch_size=batch_size, lr=0.1, weight_decay=0.0, seed=seed,
                        cosine=True)
        monkeypatch.undo()
        return [b for b in seen if (b[:, 0] >= 0).all()], calls[0]

    def test_fit_linear_takes_each_epochs_features_in_a_fresh_random_order(self, monkeypatch):
        seen, calls = self.batches(monkeypatch, seed=3)
        assert calls == 3, f"3 epochs: epoch_features() called once an epoch, got {calls} calls"
        sizes = [len(b) for b in seen]
        assert sizes == [8, 8, 4] * 3, (
            f"20 rows in batches of 8 for 3 epochs: batch sizes [8, 8, 4] each epoch, got {sizes}")
        orders = [torch.cat([b[:, 0] for b in seen[3 * e:3 * e + 3]]).long().tolist()
                  for e in range(3)]
        for e, order in enumerate(orders):
            assert sorted(order) == list(range(20)), (
                f"epoch {e + 1} must take each of the 20 rows once, took {order}")
            versions = {int(v) for b in seen[3 * e:3 * e + 3] for v in b[:, 1]}
            assert versions == {e + 1}, (
                f"epoch {e + 1} must train on that epoch's epoch_features(), call {e + 1}; "
                f"it used call(s) {sorted(versions)}")
        assert len({tuple(o) for o in orders}) == 3 and list(range(20)) not in orders, (
            f"a fresh random order each epoch, got {orders}")
        again, _ = self.batches(monkeypatch, seed=3)
        other, _ = self.batches(monkeypatch, seed=4)
        assert all(torch.equal(a, b) for a, b in zip(seen, again)), (
            "the same seed must give the same orders")
        assert not all(torch.equal(a, b) for a, b in zip(seen, other)), (
            "another seed must give other orders")

    @pytest.mark.parametrize("cosine", [True, False])
    def test_fit_linear_steps_adam_on_each_batchs_own_gradient(self, cosine):
        # Before every optimizer step, record the learning rate and weight decay Adam will
        # use, and whether each parameter's .grad is the gradient of this step's batch alone
        # (a hook on the parameter catches each backward's own gradient).
        steps, fresh = [], {}

        def before_step(optimizer, args, kwargs):
            stale = False
            for group in optimizer.param_groups:
                for p in (p for p in group["params"] if p.grad is not None):
                    if p in fresh:
                        stale |= not torch.equal(p.grad, fresh[p])
                    else:
                        p.register_hook(lambda grad, p=p: fresh.__setitem__(p, grad.clone()))
            group = optimizer.param_groups[0]
            steps.append((group["lr"], group["weight_decay"], stale))
        x, y = self.clusters(20)
        handle = register_optimizer_step_pre_hook(before_step)
        try:
            care.fit_linear(lambda: x, y, x, y, epochs=4, batch_size=8, lr=0.1,
                            weight_decay=0.01, seed=0, cosine=cosine)
        finally:
            handle.remove()
        assert len(steps) == 12, f"20 rows in batches of 8 for 4 epochs: 12 steps, got {len(steps)}"
        lrs = [0.1 * (1 + math.cos(math.pi * i / 12)) / 2 if cosine else 0.1 for i in range(12)]
        close([lr for lr, _, _ in steps], lrs, f"the learning rate at steps 1-12 ("
              f"{'cosine: 0.1 (1 + cos(pi i / 12)) / 2 at step i' if cosine else 'constant'})",
              rtol=1e-6)
        assert all(wd == 0.01 for _, wd, _ in steps), (
            f"Adam's weight decay is weight_decay (0.01), got {sorted({wd for _, wd, _ in steps})}")
        stale = [i + 1 for i, (_, _, s) in enumerate(steps) if s]
        assert not stale, (
            f"at steps {stale} Adam got gradients summed over earlier batches: zero them each step")


class TestResiduals(Grader):
    """procrustes and residuals: how well identity, rotation and linear map explain Z'."""

    # Four points on the unit circle (mean 0, total variance 4).
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])

    def residuals(self, Z, Z2):
        r = care.residuals(Z, Z2)
        return [r["identity_residual"], r["procrustes_residual"], r["linear_residual"]]

    def test_values_worked_out_by_hand(self):
        # The square turned by 90 degrees: Z' = [[0, 1], [-1, 0], [0, -1], [1, 0]]. Every row
        # of Z - Z' has squared length 2, so ||Z - Z'||^2 = 8, and Z' (mean 0) has total
        # variance 4: the identity leaves 8 / 4 = 2.0 unexplained. The best orthogonal map is
        # the turn itself (Z Q = Z' for Q = [[0, 1], [-1, 0]]): it and the best linear map
        # leave 0.
        Z, Q = self.square, torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
        close(care.procrustes(Z.double(), (Z @ Q).double()), Q,
              "procrustes: the orthogonal Q with Z Q = Z'")
        close(self.residuals(Z, Z @ Q), [2.0, 0.0, 0.0],
              "identity, rotation and linear residuals of a 90-degree turn, worked out above")

    def test_a_scaled_copy(self):
        # Z' = 2 Z: ||Z - Z'||^2 = ||Z||^2 = 4 over Z''s variance 16: 0.25 for the identity.
        # No orthogonal map stretches, so the best one is the identity (0.25 again); the
        # linear map 2 I explains everything (0).
        close(self.residuals(self.square, 2 * self.square), [0.25, 0.25, 0.0],
              "identity, rotation and linear residuals of Z' = 2 Z (the variance is Z''s)")

    def test_an_offset_copy(self):
        # Z' = Z + [3, 0]: Z''s mean is [3, 0] and its variance about that mean 4, while
        # ||Z - Z'||^2 = 4 * 9 = 36: 9 for the identity. Z has mean 0, so neither an
        # orthogonal nor a linear map of Z (no intercept, nothing centred) can add the
        # offset: 9 for both too.
        close(self.residuals(self.square, self.square + torch.tensor([3.0, 0.0])), [9.0, 9.0, 9.0],
              "identity, rotation and linear residuals of Z' = Z + [3, 0]: ||Z M - Z'||^2 "
              "over ||Z' - mean(Z')||^2, no intercept or centring")

    def test_procrustes_finds_the_best_orthogonal_map_without_centring(self):
        # Off-centre points: Z a flattened square about [0, 2], Z' the square turned by 30
        # degrees about [3, 0]. Every orthogonal map of the plane is a turn or a reflection
        # by some angle: on a grid of 0.1 degree none may fit Z' better than procrustes's Q
        # (centring Z and Z' first would fit the wrong problem: 76.5 against 9.47).
        Z = self.square * torch.tensor([1.0, 0.5]) + torch.tensor([0.0, 2.0])
        Z2 = self.square @ plane_rotation(2, 30.0).float().T + torch.tensor([3.0, 0.0])
        Z, Z2 = Z.double(), Z2.double()
        Q = care.procrustes(Z, Z2)
        close(Q.T @ Q, torch.eye(2), "Q^T Q = I: procrustes returns an orthogonal map")
        angles = torch.arange(0, 360, 0.1, dtype=torch.float64).deg2rad()
        c, s = angles.cos(), angles.sin()
        turns = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)
        maps = torch.cat([turns, turns * torch.tensor([1.0, -1.0], dtype=torch.float64)])
        best = (Z @ maps - Z2).square().sum((1, 2)).min().item()
        got = (Z @ Q - Z2).square().sum().item()
        assert got <= best + 1e-6, (
            f"||Z Q - Z'||^2 = {got:.4f}, but an orthogonal map on the grid reaches {best:.4f}")

    def test_a_known_rotation_and_a_reflection_are_recovered(self):
        Z = unit(512, 16)
        r = care.residuals(Z, Z @ random_orthogonal(16).T)
        assert r["procrustes_residual"] < 1e-6 and r["linear_residual"] < 1e-6, (
            f"Z' = Z R^T, R a random rotation: rotation and linear residuals 0, got {r}")
        assert r["identity_residual"] > 0.5, r
        mirror = torch.diag(torch.tensor([-1.0] + [1.0] * 15))
        r = care.residuals(Z, Z @ mirror)
        assert r["procrustes_residual"] < 1e-6, (
            f"a reflection is orthogonal too: residual 0, got {r}")

    @pytest.mark.parametrize("seed", range(3))
    def test_linear_then_rotation_then_identity(self, seed):
        g = torch.Generator().manual_seed(seed)
        Z = unit(256, 8, seed)
        noise = 0.3 * torch.randn(256, 8, generator=g)
        Z2 = F.normalize(Z @ torch.randn(8, 8, generator=g) + noise, dim=1)
        linear, rotation, identity = self.residuals(Z, Z2)[::-1]
        assert linear <= rotation + 1e-6 <= identity + 2e-6, (
            f"a linear map explains at least what a rotation does, a rotation what the "
            f"identity does: linear {linear}, rotation {rotation}, identity {identity}")


def plane_rotation(d, degrees):
    """A rotation of R^d (d even) turning every coordinate plane (2k, 2k+1) by `degrees`."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.block_diag(*[torch.tensor([[c, -s], [s, c]], dtype=torch.float64)] * (d // 2))


class TestRotationAngleDeg(Grader):
    """rotation_angle_deg: how far an orthogonal map turns the embeddings."""

    def test_values_worked_out_by_hand(self):
        # Q turns the plane by 60 degrees: z Q = [z1 c - z2 s, z1 s + z2 c], c = cos 60 = 1/2.
        # For z = [2, 0], z Q = [1, sqrt 3]: <z, z Q> = 2 = |z|^2 cos 60, so the angle is 60
        # degrees, whatever the length of z (here 2, and 1/2 for the second row [0, 0.5]).
        # The identity turns nothing: 0 degrees.
        c, s = 0.5, 3 ** 0.5 / 2
        Z = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
        Q = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
        close(care.rotation_angle_deg(Z, Q), 60.0, "rows [2, 0] and [0, 0.5] turned by 60 degrees")
        close(care.rotation_angle_deg(Z, torch.eye(2, dtype=torch.float64)), 0.0,
              "the identity: 0 degrees")

    def test_the_mean_of_unequal_angles(self):
        # Q turns the plane of coordinates 1, 2 by 10 degrees and that of 3, 4 by 90. The rows
        # e1 and e3 turn by 10 and 90 degrees: the mean angle is 50. The angle of the mean
        # cosine, acos((cos 10 + cos 90) / 2) = 60.5, is another number.
        Q = torch.block_diag(plane_rotation(2, 10.0), plane_rotation(2, 90.0)).T
        Z = torch.eye(4, dtype=torch.float64)[[0, 2]]
        close(care.rotation_angle_deg(Z, Q), 50.0, "rows e1 and e3 turned by 10 and 90 degrees: "
              "the mean of the angles", atol=1e-6)

    @pytest.mark.parametrize("degrees", [5.0, 30.0, 120.0])
    def test_a_turn_in_every_plane_is_measured_in_degrees(self, degrees):
        Z = unit(256, 16).double()
        close(care.rotation_angle_deg(Z, plane_rotation(16, degrees).T), degrees,
              f"256 unit vectors turned by {degrees} degrees in every plane", atol=1e-3)

    def test_only_the_planes_the_embeddings_use_count(self):
        # Embeddings in the first two coordinates; Q turns that plane by 10 degrees and the
        # plane of coordinates 3 and 4, which no embedding uses, by 170.
        Z = unit(64, 2)
        Z = torch.cat([Z, torch.zeros(64, 2)], 1).double()
        Q = torch.block_diag(plane_rotation(2, 10.0), plane_rotation(2, 170.0))
        close(care.rotation_angle_deg(Z, Q.T), 10.0,
              "only the embeddings' plane turns them (10, not 90 on average)", atol=1e-3)

    def test_the_identity_on_float32_unit_vectors_is_zero_not_nan(self):
        # In float32, <z, z> / |z|^2 rounds above 1 for about 40% of these 1000 vectors, and
        # acos of a number above 1 is nan: clamp the cosine to [-1, 1] first.
        got = care.rotation_angle_deg(unit(1000, 16), torch.eye(16))
        assert math.isfinite(got) and abs(got) < 0.05, (
            f"the identity turns float32 unit vectors by 0 degrees, got {got}")


# by_turn[k] for a stand-in encoder that reads one statistic of images turned by k / K
def turned_embeddings(read, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    reddish = torch.tensor([0.8, 0.3, 0.15]).view(1, 3, 1, 1)
    x = (reddish + 0.1 * torch.randn(n, 3, 6, 6, generator=g)).clamp(0, 1)
    K = care.HUE_TURNS                          # k / K of a turn, as a shift in [-0.5, 0.5]
    return [read(TF.adjust_hue(x, k / K - (k > K // 2))) for k in range(K)]


class TestColourProbe(Grader):
    """colour_probe: can the hue turn be read from the embedding of unseen images?"""

    def test_at_chance_on_hsv_value_and_far_above_on_mean_colour(self):
        chance = 100 / care.HUE_TURNS
        value = care.colour_probe(turned_embeddings(lambda v: v.amax(1).flatten(1)))
        assert abs(value - chance) <= 0.5, (
            f"a turn keeps HSV's value: the probe must score chance ({chance}%), got {value}%")
        mean = care.colour_probe(turned_embeddings(lambda v: v.mean((2, 3))))
        assert mean > 5 * chance, f"the mean colour shows the turn: far above chance, got {mean}%"

    def test_tested_on_images_it_did_not_see(self):
        # A code per (image, turn), unrelated to the turn: memorised on seen images, a probe
        # could name their turns, but on unseen images it can only guess.
        g = torch.Generator().manual_seed(0)
        codes = [torch.randn(64, 256, generator=g) for _ in range(care.HUE_TURNS)]
        got = care.colour_probe(codes)
        assert got < 25, (
            f"random codes per image and turn: chance (10%) on unseen images, got {got}%")

    def test_the_first_half_of_every_turns_images_trains_the_rest_test(self, monkeypatch):
        # 7 images (an odd number) under each of K turns; embedding (turn k, image i) is
        # [k, i]. linear_probe, recorded instead of run, must train on images 0-2 (7 // 2)
        # of every turn, labelled by the turn, and test on images 3-6.
        probe = Recorder(care.linear_probe, 42.0)
        monkeypatch.setattr(care, "linear_probe", probe)
        K = care.HUE_TURNS
        by_turn = [torch.tensor([[float(k), float(i)] for i in range(7)]) for k in range(K)]
        got = care.colour_probe(by_turn, seed=5)
        assert len(probe.calls) == 1 and float(got) == 42.0, (
            f"colour_probe must return its one linear_probe's accuracy: {len(probe.calls)} "
            f"calls, returned {got}")
        call = probe.calls[0]
        for split, images in (("train", range(3)), ("test", range(3, 7))):
            h, y = call[f"{split}_h"], call[f"{split}_y"]
            got = sorted((int(a), int(b), int(c)) for (a, b), c in zip(h.tolist(), y.tolist()))
            want = sorted((k, i, k) for k in range(K) for i in images)
            assert got == want, (
                f"the {split} split must hold images {list(images)} of every turn labelled by "
                f"the turn, as (turn, image, label): got {got[:8]}...")
        settings = {k: call[k] for k in ("batch_size", "lr", "seed")}
        assert settings == dict(batch_size=64, lr=1e-2, seed=5), f"linear_probe's: {settings}"

    def test_repeatable_for_a_seed_and_leaves_the_global_random_stream_alone(self):
        by_turn = turned_embeddings(lambda v: v.mean((2, 3)) + 0.05 * torch.randn(len(v), 3))
        before = torch.random.get_rng_state()
        a = care.colour_probe(by_turn, seed=3)
        assert torch.equal(torch.random.get_rng_state(), before), (
            "the probe must not draw from the global stream")
        assert a == care.colour_probe(by_turn, seed=3), "the same seed must give the same accuracy"


def test_every_exercise_has_its_grading_class_and_only_its_own_tests_in_it():
    classes = {n for n, v in globals().items() if n.startswith("Test") and isinstance(v, type)}
    graders = {care.grader(name).split("::")[1] for name in care.EXERCISES}
    assert classes == graders, f"one class per exercise: {sorted(classes ^ graders)}"
    for name, (functions, _) in care.EXERCISES.items():
        source = ast.get_source_segment(SOURCE, next(
            n for n in ast.parse(SOURCE).body if isinstance(n, ast.ClassDef)
            and n.name == care.grader(name).split("::")[1]))
        called = set(re.findall(r"care\.([a-z_0-9]+)\(", source))
        others = {f for n, (fs, _) in care.EXERCISES.items() if n != name for f in fs}
        assert not called & others, f"{name}'s tests call other exercises: {called & others}"


SOURCE = open(os.path.join(HERE, "test_care.py")).read()
STUB = re.compile(r'raise NotImplementedError\("exercise (\w+): write (\w+), then grade it in '
                  r'this folder: (python -m pytest -q test_care.py::\w+)"\)')


def stub_copy(tmp_path, *names):
    """python care.py --exercise NAMES --out tmp_path/course: the student's copy."""
    care.main(["--exercise", *names, "--out", str(tmp_path / "course")])
    return (tmp_path / "course" / "care.py").read_text()


def exercised(source):
    """{function: (the lines after its docstring, the docstring's indent)} of a care.py."""
    lines = source.split("\n")
    return {n.name: (lines[n.body[0].end_lineno:n.end_lineno], n.body[0].col_offset)
            for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}


def restore(copy, original):
    """The copy with each stub (its hints and the raise) replaced by the original body."""
    lines, bodies = copy.split("\n"), exercised(original)
    for node in reversed(ast.parse(copy).body):
        if isinstance(node, ast.FunctionDef) and STUB.search(lines[node.end_lineno - 1]):
            lines[node.body[0].end_lineno:node.end_lineno] = bodies[node.name][0]
    return "\n".join(lines)


def test_exercise_copy_stubs_the_named_functions_and_keeps_everything_else(tmp_path, capsys):
    copy = stub_copy(tmp_path, "info_nce", "residuals", "info_nce")     # a name twice: once
    original = open(care.__file__).read()
    out = capsys.readouterr().out
    course = tmp_path / "course"
    assert out.count(f"cd {course} && {care.grader('info_nce')}") == 1, out
    assert f"cd {course} && {care.grader('residuals')}" in out
    assert STUB.findall(copy) == [("info_nce", "similarity_logits", care.grader("info_nce")),
                                  ("info_nce", "info_nce", care.grader("info_nce")),
                                  ("residuals", "procrustes", care.grader("residuals")),
                                  ("residuals", "residuals", care.grader("residuals"))]
    assert "# The orthogonal equivariance loss, and why it works." in copy
    assert restore(copy, original) == original, "the copy differs from care.py beyond the bodies"
    assert (course / "test_care.py").read_text() == SOURCE
    code, line = run_error(["--exercise", "info_nce", "--out", str(course)], capsys)
    assert code == 2 and "exists" in line                       # a student's work is kept
    code, line = run_error(["--exercise", "softmax", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "no exercise 'softmax'" in line
    assert "the exercises: info_nce, alignment_uniformity" in line


def test_every_stub_keeps_the_comments_of_its_body_above_the_raise(tmp_path):
    copy = stub_copy(tmp_path, *care.EXERCISES)
    original, stubbed = exercised(open(care.__file__).read()), exercised(copy)
    hints = 0
    for name in (f for fs, _ in care.EXERCISES.values() for f in fs):
        body, indent = original[name]
        comments = [" " * indent + l.strip() for l in body if l.strip().startswith("#")]
        assert stubbed[name][0][:-1] == comments and STUB.search(stubbed[name][0][-1]), (
            f"{name}'s stub must keep its body's comment lines, then raise: {stubbed[name][0]}")
        hints += len(comments)
    assert hints >= 6                   # the HSV closed form, the separable blur, group sharing


def test_a_course_folder_in_the_repository_keeps_the_readmes_commands_working(tmp_path):
    """The README's test command from the repository, with course/ inside it, and the
    grading command that --exercise prints, typed in course/ as shown."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("care.py", "test_care.py"):
        shutil.copy(os.path.join(HERE, f), repo)
    run = lambda cmd, cwd: subprocess.run([sys.executable, "-m", "pytest", *cmd, "-p",
                                           "no:cacheprovider"], cwd=cwd, capture_output=True,
                                          text=True, timeout=600)
    subprocess.run([sys.executable, "care.py", "--exercise", "knn_top1", "--out", "course/"],
                   cwd=repo, check=True, capture_output=True)
    p = run(["-q", "test_care.py", "--collect-only"], repo)
    assert p.returncode == 0, p.stdout[-2000:]                  # no "import file mismatch"
    grade = care.grader("knn_top1").split()[3:]                 # pytest -q test_care.py::...
    p = run(grade, repo / "course")
    assert p.returncode == 1 and "NotImplementedError: exercise knn_top1: write" in p.stdout, (
        p.stdout[-2000:])
    shutil.copy(os.path.join(HERE, "care.py"), repo / "course")     # the student's answer
    p = run(grade, repo / "course")
    assert p.returncode == 0, p.stdout[-2000:]


def run_graders(folder):
    """Every exercise's grader on the care.py in folder: {exercise: (passed, output)}."""
    classes = {care.grader(n).split("::")[1]: n for n in care.EXERCISES}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                        *(f"test_care.py::{c}" for c in classes)], cwd=folder, text=True,
                       capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    failed = set(re.findall(r"^FAILED test_care.py::(\w+)::", p.stdout, re.M))
    return {n: (c not in failed, p.stdout) for c, n in classes.items()}


@pytest.mark.skipif(not os.environ.get("CARE_TEST_COURSE"),
                    reason="every grader once per exercise (minutes): CI sets CARE_TEST_COURSE=1")
@pytest.mark.parametrize("name", list(care.EXERCISES))
def test_a_stub_fails_its_grader_and_its_dependents_only_and_restored_passes_all(name, tmp_path):
    copy = stub_copy(tmp_path, name)
    depends = {n for n, (_, needs) in care.EXERCISES.items() if name in needs}
    results = run_graders(tmp_path / "course")
    failing = {n for n, (passed, _) in results.items() if not passed}
    assert failing == {name} | depends, results[name][1][-3000:]
    assert f"NotImplementedError: exercise {name}: write" in results[name][1]
    assert restore(copy, open(care.__file__).read()) == open(care.__file__).read()


# =====================================================================================
# Part 2: the rest of the method and of the tool.
# =====================================================================================
@pytest.mark.parametrize("op,factor", [("brightness", 1.3), ("brightness", 0.6),
                                       ("contrast", 0.7), ("contrast", 1.4),
                                       ("saturation", 0.6), ("saturation", 1.4)])
def test_colour_ops_match_torchvision(op, factor):
    x = images(4)
    ours = getattr(care, f"adjust_{op}")(x, torch.full((4, 1, 1, 1), factor))
    assert torch.allclose(ours, getattr(TF, f"adjust_{op}")(x, factor), atol=1e-5)


@pytest.mark.parametrize("scale_min", [0.08, 0.2, 0.5])
def test_crop_minimum_scale_is_respected(scale_min):
    # An image whose red channel is its x coordinate: the crop's width shows in the output.
    W = 32
    x = torch.linspace(0, 1, W).view(1, 1, 1, W).expand(1, 3, W, W).contiguous()
    smallest = care.random_resized_crop(x, torch.zeros(1, 10), torch.full((1, 10), 0.5),
                                        torch.zeros(1, 2), scale=(scale_min, 1.0))
    seen = smallest[0, 0, 0].max() - smallest[0, 0, 0].min()   # share of the width crossed
    side = scale_min ** 0.5                                     # aspect 1: side = sqrt(area)
    assert abs(seen.item() * (W - 1) - (side * W - 1)) < 1.0


def test_crop_of_whole_image_is_identity_and_matches_torchvision_resize():
    x = images(2)
    full = care.random_resized_crop(x, torch.ones(2, 10), torch.full((2, 10), 0.5),
                                    torch.zeros(2, 2))       # area 1, aspect 1 -> the image
    assert torch.allclose(full, x, atol=1e-6)
    # A half-size box at (4, 2): torchvision's crop + bilinear resize, away from the border
    ref = TF.resized_crop(x, 2, 4, 8, 8, [16, 16], antialias=False)
    u_scale = torch.full((2, 10), (0.25 - 0.08) / 0.92)     # area = 1/4 of 16x16
    ours = care.random_resized_crop(x, u_scale, torch.full((2, 10), 0.5),
                                    torch.tensor([[0.5, 0.25]] * 2))   # x0 = 4, y0 = 2
    assert torch.allclose(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet50", 2048)])
def test_encoder_outputs(arch, width):
    model = care.Encoder(arch, feature_dim=32).eval()
    h, z = model(torch.randn(3, 3, 16, 16))
    assert h.shape == (3, width) and model.dim == width and z.shape == (3, 32)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.backbone.conv1.stride == (1, 1)


def test_imagenet_stem_shrinks_4x_before_the_blocks_and_cifar_stem_does_not():
    inner = {}
    for stem in ("cifar", "imagenet"):
        model = care.Encoder("resnet18", feature_dim=8, stem=stem).eval()
        model.backbone.layer1.register_forward_hook(lambda m, i, o, s=stem: inner.update({s: o.shape}))
        h, z = model(torch.randn(2, 3, 64, 64))
        assert h.shape == (2, 512) and z.shape == (2, 8)
    assert inner["cifar"][-2:] == (64, 64) and inner["imagenet"][-2:] == (16, 16)
    assert care.Encoder(stem="imagenet").backbone.conv1.kernel_size == (7, 7)
    assert care.stem_for(32) == "cifar" and care.stem_for(64) == "imagenet"


def test_encoder_rejects_unknown_arch():
    with pytest.raises(ValueError, match="resnet18"):
        care.Encoder("vgg11")


def test_a_few_care_steps_lower_the_loss_and_uniformity_alone_trains():
    for contrastive in ("infonce", "uniformity"):
        torch.manual_seed(0)
        model = care.Encoder("resnet18", feature_dim=16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        cfg = cfg_for(contrastive=contrastive, group_size=4)
        x, g = (images(16, H=8) * 255).to(torch.uint8), torch.Generator().manual_seed(0)
        rows = torch.stack([care.train_step(model, opt, x, cfg, g) for _ in range(8)])
        loss, unif, equi = (rows[:, care.TERMS.index(k)]
                            for k in ("loss", "uniformity", "equivariance"))
        assert loss[-3:].mean() < loss[:3].mean(), contrastive
        if contrastive == "uniformity":
            assert torch.allclose(loss, unif + 0.03 * equi)      # no alignment in the loss


def test_pair_per_batch_shares_one_augmentation_pair_across_the_whole_batch():
    sizes = []

    def spy(x, group_size, generator):
        sizes.append(group_size)
        return care.augment(x, group_size, generator)
    model = care.Encoder("resnet18", feature_dim=8)
    x = (images(16, H=8) * 255).to(torch.uint8)
    for pair_per, shared in (("group", 4), ("batch", 16)):
        sizes.clear()
        cfg = cfg_for(group_size=4, pair_per=pair_per)
        opt = torch.optim.Adam(model.parameters())
        care.train_step(model, opt, x, cfg, torch.Generator().manual_seed(0), spy)
        assert sizes == [1, 1, shared, shared]


@pytest.mark.parametrize("precision,channels_last", [("bf16", True), ("fp16", False)])
def test_mixed_precision_step_on_cpu_keeps_losses_and_evaluation_in_float32(precision, channels_last):
    torch.manual_seed(0)
    cfg = cfg_for(group_size=4)
    machine = care.Machine(care.PRECISIONS[precision], channels_last, torch.device("cpu"))
    model, net = care.build_model(cfg, torch.device("cpu"), machine)
    w = model.backbone.conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) == channels_last
    opt, _ = care.make_optimizer(model, cfg, 1)
    assert machine.scaler.is_enabled() == (precision == "fp16")   # loss scaling for fp16 only
    before = [p.detach().clone() for p in model.parameters()]
    terms = care.train_step(net, opt, (images(8, H=8) * 255).to(torch.uint8), cfg,
                            torch.Generator().manual_seed(0), care.augment, machine)
    assert terms.dtype == torch.float32 and torch.isfinite(terms).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    h, z = care.embed(model, (images(4, H=8) * 255).to(torch.uint8), lambda v: v)
    assert h.dtype == torch.float32 and z.dtype == torch.float32


def test_precision_auto_picks_by_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert care.amp_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert care.amp_dtype("auto", cpu) == torch.bfloat16
    assert care.amp_dtype("fp16", cpu) == torch.float16
    cuda = torch.device("cuda", 0)
    for major, dtype in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, m=major: (m, 0))
        assert care.amp_dtype("auto", cuda) == dtype


@pytest.mark.skipif(not os.environ.get("CARE_TEST_COMPILE"),
                    reason="torch.compile takes minutes on 2 cores: CI runs it with CARE_TEST_COMPILE=1")
def test_compiled_training_steps_on_cpu():
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler: torch.compile cannot build CPU kernels here")
    torch.manual_seed(0)
    cfg = cfg_for(compile=True, group_size=4)
    machine = care.Machine(torch.bfloat16, True, torch.device("cpu"))
    model, net = care.build_model(cfg, torch.device("cpu"), machine)
    opt, _ = care.make_optimizer(model, cfg, 1)
    g, x = torch.Generator().manual_seed(0), (images(16, H=8) * 255).to(torch.uint8)
    rows = [care.train_step(net, opt, x, cfg, g, care.augment, machine) for _ in range(3)]
    assert all(torch.isfinite(r).all() for r in rows)


# ---------------------------------------------------------------- the geometry diagnostics
def test_gram_error_is_zero_for_a_rotation_and_positive_otherwise():
    Z = unit(64, 8)
    assert care.gram_error(Z, Z @ random_orthogonal(8).T) < 1e-10
    assert care.gram_error(Z, unit(64, 8, 1)) > 1e-3


def test_hue_cosines_and_colour_probes_come_from_turned_images(tiny_folder):
    data = care.load_data("folder", str(tiny_folder), 8)
    torch.manual_seed(0)
    d = care.colour_diagnostics(care.Encoder(feature_dim=16).eval(), data.test_x, data)
    assert list(d["hue_cosine"]) == list(d["hue_cosine_z"]) == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    assert all(-1 <= v <= 1 for v in d["hue_cosine"].values())
    assert d["hue_cosine_z"]["0.5"] < 1 - 1e-4 and 0 <= d["colour_probe_top1"] <= 100


@pytest.mark.parametrize("family", ["flip", "grayscale"])
def test_family_pairs_differ_in_that_family_only(family):
    x, g = images(4), torch.Generator().manual_seed(0)
    a, a2 = care.family_pair(family, g)
    v, v2 = (care.augment(x, 4, u=u, mean=(0.0,) * 3, std=(1.0,) * 3) for u in (a, a2))
    expected = v.flip(3) if family == "flip" else care.rgb_to_grayscale(v).expand_as(v)
    assert torch.allclose(v2, expected, atol=1e-5) and not torch.allclose(v, v2, atol=1e-3)


# ------------------------------------------------- data, training, record (end to end)
@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """An image folder of 3 colour classes: 24 train and 8 test 12x12 PNGs per class."""
    from PIL import Image
    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]]).float()
    for split, n in (("train", 24), ("test", 8)):
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                noise = 60 * torch.randn(3, 12, 12, generator=g)
                img = (colours[c].view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / f"class{c}" / f"{i}.png")
    return root


def tiny_args(root, out, *extra):
    return ["--dataset", "folder", "--data-root", str(root), "--image-size", "8",
            "--batch-size", "16", "--group-size", "4", "--device", "cpu", "--knn-every", "1",
            "--out", str(out), *extra]


@pytest.fixture(scope="session")
def trained(tiny_folder, tmp_path_factory):
    """One CARE run of 2 epochs on the tiny folder, monitored every epoch: its folder.
    Shared by many tests: read it, or copy_run() it before changing anything."""
    out = tmp_path_factory.mktemp("trained") / "care"
    care.main(tiny_args(tiny_folder, out, "--epochs", "2"))
    return out


def copy_run(trained, tmp_path):
    """A private copy of the shared run; returns its checkpoint's path as a string."""
    shutil.copytree(trained, tmp_path / "run")
    return str(tmp_path / "run" / "checkpoint.pt")


def configure(argv):
    """care.configure on a command line, as main() calls it."""
    return care.configure(vars(care.build_parser().parse_args(argv)))


def read_json(path):
    import json
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_cifar_on_disk_loads_as_uint8_splits(name, tmp_path, monkeypatch):
    """The default data path (python care.py --epochs 200): torchvision reads a tiny CIFAR
    written in its own on-disk format (its checksums patched, nothing downloaded)."""
    import pickle
    import torchvision.datasets.cifar as cifar
    cls = getattr(care.torchvision.datasets, name.upper())
    folder, classes = tmp_path / cls.base_folder, 10 if name == "cifar10" else 100
    folder.mkdir()
    index = iter(range(1000))                           # image i: R = i, G = 100 + i, B = 200 + i
    for file, _ in cls.train_list + cls.test_list:
        ids = [next(index) for _ in range(8 if name == "cifar100" else 4)]
        planes = torch.tensor([[i, 100 + i, 200 + i] for i in ids], dtype=torch.uint8)
        data = planes[:, :, None].expand(-1, -1, 1024).reshape(len(ids), 3072)  # R, G, B planes
        labels = {"labels" if name == "cifar10" else "fine_labels": [i % classes for i in ids]}
        with open(folder / file, "wb") as f:
            pickle.dump({"data": data.numpy(), **labels}, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{c}" for c in range(classes)]}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    n_train = 20 if name == "cifar10" else 8
    d = care.load_data(name, str(tmp_path), 32)
    assert d.train_x.shape == (n_train, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert len(d.test_x) == (4 if name == "cifar10" else 8) and len(d.classes) == classes
    i = d.train_x[:, 0, 0, 0].long()                    # red is the image's number
    assert torch.equal(d.train_x[:, 1, 5, 7].long(), 100 + i) and torch.equal(
        d.train_x[:, 2, 31, 0].long(), 200 + i), "channels in RGB order, each a whole plane"
    assert torch.equal(d.train_y, i % classes) and d.classes[3] == "class3"
    sub = care.load_data(name, str(tmp_path), 16, train_subset=5)
    assert sub.train_x.shape == (5, 3, 16, 16) and sub.test_x.shape[1:] == (3, 16, 16)
    assert torch.equal(sub.train_y, sub.train_x[:, 0, 0, 0].long() % classes), (
        "the subset keeps each image with its label")
    assert set(sub.train_x[:, 0, 0, 0].tolist()) < set(i.tolist())


def test_load_folder_holds_uint8_splits_with_labels_and_subset(tiny_folder):
    d = care.load_data("folder", str(tiny_folder), 8, train_subset=10)
    assert d.train_x.shape == (10, 3, 8, 8) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (24, 3, 8, 8) and d.classes == ["class0", "class1", "class2"]
    assert sorted(d.test_y.tolist()) == [0] * 8 + [1] * 8 + [2] * 8
    again = care.load_data("folder", str(tiny_folder), 8, train_subset=10)
    assert torch.equal(d.train_x, again.train_x)                  # the subset is fixed


def test_end_to_end_care_run_writes_the_record(trained):
    m = read_json(trained / "metrics.json")
    assert m["world_size"] == 1 and m["config"]["method"] == "care"
    assert m["device"].startswith("cpu")
    assert m["wall_time_s"] > 0 and 0 <= m["linear_top1"] <= 100
    rows = m["epochs"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] is None and rows[0]["knn_top1"] is not None
    for r in rows[1:]:
        assert set(r) >= {"loss", "info_nce", "alignment", "uniformity", "equivariance",
                          "knn_top1", "images_per_s", "seconds", "lr"}
        assert r["loss"] == pytest.approx(r["info_nce"] + 0.03 * r["equivariance"], rel=1e-4)
        assert r["info_nce"] > r["alignment"] + r["uniformity"]     # the remainder is positive
    geometry = {"gram_error", "identity_residual", "procrustes_residual", "linear_residual",
                "rotation_angle_deg", "hue_cosine", "hue_cosine_z", "colour_probe_top1",
                "colour_probe_top1_z"}
    for r in rows:                                  # measured with kNN, every epoch here
        assert set(r) >= geometry and r["pairs"] == 2
    d = m["diagnostics"]
    assert set(d) >= geometry and d["pairs"] == 8 and list(d["by_family"]) == list(care.FAMILIES)
    assert len(d["gram_matrices"]["G"]) == 16 and d["gram_matrices"]["G"][3][3] == pytest.approx(1)
    assert 0 <= d["rotation_angle_deg"] <= 180
    assert d["linear_residual"] <= d["procrustes_residual"] + 1e-9 <= d["identity_residual"] + 2e-9
    for f in ("checkpoint.pt", "train.log", "curves.png", "geometry.png"):
        assert (trained / f).stat().st_size > 0
    log = (trained / "train.log").read_text()
    assert "linear probe top-1" in log and "settings: --method care" in log
    assert "--epochs 2" in log and "| this machine: --device cpu --precision auto" in log


def test_load_encoder_gives_the_runs_own_features(tiny_folder, trained):
    last = read_json(trained / "metrics.json")["epochs"][-1]
    encoder = care.load_encoder(str(trained / "checkpoint.pt"))
    assert not encoder.training and next(encoder.parameters()).device.type == "cpu"
    data = care.load_data("folder", str(tiny_folder), 8)
    assert tuple(encoder.mean) == data.mean and tuple(encoder.std) == data.std
    x = care.normalize(data.test_x.float() / 255, encoder.mean, encoder.std)   # the README's way
    with torch.no_grad():
        h = encoder.backbone(x)
    train_h, train_y, test_h, test_y = care.features(encoder, data)
    assert torch.allclose(h, test_h, atol=1e-5)
    assert care.knn_top1(train_h, train_y, h, test_y) == last["knn_top1"]      # as recorded
    aug = care.functools.partial(care.augment, mean=data.mean, std=data.std)
    geometry = care.geometry_diagnostics(encoder, data, aug, n_pairs=2, full=False)
    assert geometry["gram_error"] == pytest.approx(last["gram_error"], rel=1e-6)   # z too


def test_uniformity_run_records_both_halves_and_reference_linear_eval(tiny_folder, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(care, "PROBE_EPOCHS", 3)
    m = care.main(tiny_args(tiny_folder, tmp_path / "u", "--epochs", "1", "--contrastive",
                            "uniformity", "--linear-eval", "reference", "--knn-every", "5"))
    r = m["epochs"][1]
    assert r["loss"] == pytest.approx(r["uniformity"] + 0.03 * r["equivariance"], rel=1e-4)
    assert r["alignment"] is not None and r["info_nce"] is not None
    assert 0 <= m["linear_top1"] <= 100 and 0 <= m["linear_top1_reference"] <= 100
    assert "reference linear evaluation top-1" in (tmp_path / "u" / "train.log").read_text()


def test_augmentations_figure(tiny_folder, tmp_path, capsys):
    care.main(["--augmentations", "--dataset", "folder", "--data-root", str(tiny_folder),
               "--image-size", "12", "--out", str(tmp_path)])
    assert (tmp_path / "augmentations.png").stat().st_size > 10_000
    assert "augmentations.png" in capsys.readouterr().out


def test_simclr_run_and_compare(tiny_folder, trained, tmp_path, capsys):
    care.main(tiny_args(tiny_folder, tmp_path / "simclr", "--epochs", "1", "--method", "simclr",
                        "--knn-every", "5"))
    m = read_json(tmp_path / "simclr" / "metrics.json")
    assert m["config"]["lam"] == 0 and m["epochs"][1]["equivariance"] is None
    assert m["epochs"][1]["loss"] == pytest.approx(m["epochs"][1]["info_nce"])
    capsys.readouterr()
    care.main(["--compare", str(trained), str(tmp_path / "simclr"), "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    assert "\ncare " in table and "\nsimclr " in table and "Gram err" in table
    old_record = {"epochs": [{"epoch": 0, "knn_top1": 30.0}], "diagnostics": {}}  # no geometry
    assert care.recorded("knn", [old_record]) and not care.recorded("gram", [old_record])
    assert not care.recorded("families", [old_record])
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    # runs that differ only by seed are one group: mean +- spread (a second seed's record,
    # made from the first's with other numbers)
    other = read_json(trained / "metrics.json")
    other["config"]["seed"], other["linear_top1"] = 1, other["linear_top1"] + 5
    (tmp_path / "seed1").mkdir()
    care.atomic_save(other, str(tmp_path / "seed1" / "metrics.json"))
    care.main(["--compare", str(trained), str(tmp_path / "seed1"), "--out", str(tmp_path / "cmp")])
    pooled = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("care "))
    assert pooled.split()[1] == "2" and "+-" in pooled           # label, seeds, kNN, linear


def test_help_lists_every_flag_of_the_settings_table_and_the_recipes(capsys):
    with pytest.raises(SystemExit) as e:
        care.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = set(re.findall(r"^  (--[a-z-]+)", text, re.M)) | {"--help"}
    assert flags == {"--" + k.replace("_", "-") for k, s in care.SETTINGS.items() if s.flag} | {
        "--help"} and len(flags) <= 32
    assert "stl10       --lam 0.01 --group-size 32 --optimizer sgd --lr 0.06" in text
    assert "warmup_epochs=0" in text and "(default: None)" not in text


@pytest.mark.parametrize("dataset,expected", [
    ("cifar10", dict(lam=0.03, group_size=16, optimizer="adam", lr=1e-3, weight_decay=1e-6,
                     lr_schedule="constant")),
    ("folder", dict(lam=0.03, group_size=16, optimizer="adam", lr=1e-3, weight_decay=1e-6)),
    ("cifar100", dict(lam=0.001, group_size=64, optimizer="adam", lr=1e-3)),
    ("stl10", dict(lam=0.01, group_size=32, optimizer="sgd", lr=0.06, weight_decay=5e-4,
                   lr_schedule="cosine", warmup_epochs=10)),
    ("imagenet100", dict(image_size=224, arch="resnet50", group_size=8, pair_per="batch",
                         lam=0.005, temperature=0.2, lr=0.4, warmup_epochs=0, blur_kernel=5,
                         crop_scale_min=0.2, knn_k=20)),
])
def test_recipe_by_dataset_and_typed_flags_win(dataset, expected, tmp_path):
    base = ["--dataset", dataset, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    cfg, _ = configure(base)
    assert {k: getattr(cfg, k) for k in expected} == expected
    cfg, _ = configure(base + ["--lam", "0.2", "--lr", "0.5", "--group-size", "8"])
    assert (cfg.lam, cfg.lr, cfg.group_size) == (0.2, 0.5, 8)
    assert cfg.optimizer == ("sgd" if dataset in ("stl10", "imagenet100") else "adam")


def test_stl10_offline_prints_its_recipe_before_the_download_error(monkeypatch, tmp_path, capsys):
    class Offline:
        def __init__(self, root, download=False, **kw):
            raise RuntimeError("Dataset not found.") if not download else OSError("no network")
    monkeypatch.setattr(care.torchvision.datasets, "STL10", Offline)
    code, line = run_error(["--dataset", "stl10", "--data-root", str(tmp_path / "empty"),
                            "--device", "cpu", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "could not download stl10" in line
    for flag in ("--lam 0.01", "--group-size 32", "--optimizer sgd", "--lr 0.06",
                 "--weight-decay 0.0005", "--lr-schedule cosine"):
        assert flag in run_error.stdout, flag


def test_resume_takes_the_checkpoints_settings_and_refuses_other_run_settings(trained, tmp_path,
                                                                              capsys):
    ckpt = copy_run(trained, tmp_path)
    cfg, _ = configure(["--resume", ckpt])
    got = (cfg.epochs, cfg.image_size, cfg.group_size, cfg.lam, cfg.knn_every)
    assert got == (2, 8, 4, 0.03, 1)
    assert cfg.out == str(tmp_path / "run") and cfg.data_root == read_json(
        trained / "metrics.json")["config"]["data_root"]
    # a script repeats its whole command with --resume: the same values are fine
    cfg, _ = configure(["--resume", ckpt, "--lam", "0.03", "--group-size", "4", "--epochs", "5",
                        "--knn-every", "3", "--precision", "fp32", "--device", "cpu"])
    assert (cfg.lam, cfg.epochs, cfg.knn_every, cfg.precision) == (0.03, 5, 3, "fp32")
    for flag, value, words in (("--arch", "resnet34", "--arch resnet18, not resnet34"),
                               ("--optimizer", "sgd", "--optimizer adam, not sgd"),
                               ("--lam", "0.1", "--lam 0.03, not 0.1"),
                               ("--temperature", "0.2", "--temperature 0.5, not 0.2")):
        code, line = run_error(["--resume", ckpt, flag, value], capsys)
        assert code == 2 and words in line and f"drop {flag}" in line
    saved = torch.load(ckpt, weights_only=True)                 # a cosine schedule's length
    saved["config"]["lr_schedule"] = "cosine"                   # is fixed: no jump in the lr
    torch.save(saved, tmp_path / "cosine.pt")
    with pytest.raises(care.CareError, match="cosine schedule ends at epoch 2"):
        configure(["--resume", str(tmp_path / "cosine.pt"), "--epochs", "3"])


def test_resume_takes_the_machine_settings_from_this_machine(trained, tmp_path):
    ckpt = copy_run(trained, tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    saved["config"].update(sync_bn=True, compile=True, device="cuda", precision="fp16")
    torch.save(saved, ckpt)                                     # as saved on a GPU node
    cfg, _ = configure(["--resume", ckpt, "--epochs", "3"])
    assert (cfg.sync_bn, cfg.compile, cfg.device, cfg.precision) == (False, False, "auto", "auto")
    assert cfg.epochs == 3 and cfg.group_size == 4              # the run's own settings stay


def test_resume_rejects_corrupt_checkpoints_and_never_overwrites_a_run(tiny_folder, trained,
                                                                      tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, line = run_error(["--resume", str(bad)], capsys)
    assert code == 2 and "cannot read" in line
    code, line = run_error(tiny_args(tiny_folder, trained, "--epochs", "1"), capsys)
    assert code == 2 and "already holds a run" in line


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    care.atomic_save({"epoch": 1}, path)

    def crash(obj, f):                                          # dies half-way through
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(care.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        care.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt"]


def test_interrupt_then_resume_continues_exactly_with_fresh_streams(tiny_folder, trained,
                                                                    tmp_path, monkeypatch, capsys):
    # The random streams are keyed by (seed, epoch[, rank]): nothing to carry over, so a
    # checkpoint resumed on another device (whose generator it could not restore) still
    # draws a new order for the next epoch.
    order = lambda epoch: torch.randperm(72, generator=care.random_stream("cpu", 0, epoch))
    assert not torch.equal(order(1), order(2)) and torch.equal(order(2), order(2))
    calls, real_step = [0], care.train_step

    def ctrl_c_in_epoch_2(*a, **k):                             # 72 images / 16 = 4 steps
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(care, "train_step", ctrl_c_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        care.main(tiny_args(tiny_folder, tmp_path / "b", "--epochs", "2"))
    assert e.value.code == 130 and "--resume" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_json(tmp_path / "b" / "metrics.json")["epochs"]] == [0, 1]
    monkeypatch.undo()
    keys, real = [], care.random_stream
    monkeypatch.setattr(care, "random_stream", lambda dev, *key: keys.append(key) or real(dev, *key))
    resumed = care.main(["--resume", str(tmp_path / "b" / "checkpoint.pt")])
    assert keys[:2] == [(0, 2), (0, 2, 0)]                     # order, then augmentations
    a, b = read_json(trained / "metrics.json")["epochs"], resumed["epochs"]
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], rel=1e-5)
    assert b[2]["knn_top1"] == a[2]["knn_top1"]
    assert resumed["linear_top1"] == read_json(trained / "metrics.json")["linear_top1"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(trained, tmp_path,
                                                                      monkeypatch, capsys):
    ckpt = copy_run(trained, tmp_path)
    monkeypatch.setattr(care, "info_nce", lambda *a: torch.tensor(float("nan")))
    monkeypatch.setattr(care, "LOG_EVERY", 1)
    code, line = run_error(["--resume", ckpt, "--epochs", "3"], capsys)
    assert code == 1 and "non-finite loss" in line and "epoch 3 step 1/4" in line
    assert torch.load(ckpt)["epoch"] == 2


def test_sigterm_keeps_last_epoch_and_exits_without_traceback(tiny_folder, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "care.py", *tiny_args(tiny_folder, out, "--epochs", "500")],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600                # a loaded machine: the first epoch, however slow
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr + stdout
    assert "--resume" in stdout
    kept = torch.load(out / "checkpoint.pt")["epoch"]
    assert kept >= 1 and [r["epoch"] for r in read_json(out / "metrics.json")["epochs"]] == list(
        range(kept + 1))


def test_monitoring_every_epoch_leaves_training_unchanged(tiny_folder, trained, tmp_path):
    every = read_json(trained / "metrics.json")
    rarely = care.main(tiny_args(tiny_folder, tmp_path / "b", "--epochs", "2", "--knn-every", "2"))
    assert [r.get("colour_probe_top1") is None for r in rarely["epochs"]] == [False, True, False]
    for r, q in zip(every["epochs"][1:], rarely["epochs"][1:]):     # epoch 2 follows a monitor
        assert [r[k] for k in care.TERMS] == [q[k] for k in care.TERMS]     # in one run only
    assert every["epochs"][2]["gram_error"] == rarely["epochs"][2]["gram_error"]


def test_adam_moments_keep_the_channels_last_layout_through_a_checkpoint(tmp_path):
    """care.py trains channels_last: Adam's moments take that layout, torch.save keeps it,
    and restore hands it back, so Adam keeps its fast multi-tensor path after a resume."""
    cfg, machine = cfg_for(group_size=4), care.Machine(torch.float32, True)
    model, _ = care.build_model(cfg, torch.device("cpu"), machine)
    opt, sched = care.make_optimizer(model, cfg, 4)
    care.train_step(model, opt, (images(8, H=8) * 255).to(torch.uint8), cfg, machine=machine)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1,
                "scheduler": sched.state_dict(), "metrics": {"wall_time_s": 1.0, "epochs": []}},
               tmp_path / "checkpoint.pt")
    model, _ = care.build_model(cfg, torch.device("cpu"), machine)
    opt, sched = care.make_optimizer(model, cfg, 4)
    care.restore(torch.load(tmp_path / "checkpoint.pt", weights_only=True),
                 care.RunState(model, model, opt, sched, machine, None, None, {}, print))
    w = model.backbone.layer1[0].conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[w]["exp_avg"].stride() == opt.state[w]["exp_avg_sq"].stride() == w.stride()


def test_restore_keeps_this_machines_fused_optimizer(trained):
    """A CPU checkpoint (unfused Adam) resumed where Adam is fused (CUDA; here a fused CPU
    Adam stands in) stays fused, so fp16's loss scaler can hand it grad_scale."""
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert not ckpt["optimizer"]["param_groups"][0]["fused"]
    model, _ = care.build_model(cfg_for(group_size=4), torch.device("cpu"), care.Machine())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    machine = care.Machine()
    care.restore(ckpt, care.RunState(model, model, opt, sched, machine, None, None, {}, print))
    assert opt.param_groups[0]["fused"]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(sum(p.sum() for p in model.parameters())).backward()
    scaler.step(opt)                            # unfused Adam would refuse grad_scale here


def test_out_of_memory_wrapped_by_the_compiler_is_one_line(monkeypatch, tmp_path, capsys):
    def compile_fails(cfg, ckpt=None):
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised") from e
    monkeypatch.setattr(care, "launch", compile_fails)
    code, line = run_error(["--device", "cpu", "--out", str(tmp_path)], capsys)
    assert code == 1 and "out of memory" in line


def test_features_do_not_copy_a_fully_labelled_split(tiny_folder):
    data = care.load_data("folder", str(tiny_folder), 8)
    x, y = care.labelled(data)
    assert x is data.train_x and y is data.train_y
    data.train_y[:5] = -1                                         # STL-10's unlabelled images
    x, y = care.labelled(data)
    assert len(x) == len(data.train_x) - 5 and (y >= 0).all()


# ------------------------------------------------------------- several processes (DDP)
def _objective_on_my_share(rank, world, init_file, z, out):
    """One of `world` processes: the objective on its slice of the fixed embeddings z."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=world)
    try:
        b = len(z[0]) // world
        mine = [t[rank * b:(rank + 1) * b].clone().requires_grad_() for t in z]
        terms = care.objective(mine, cfg_for(group_size=4), care.Machine().gather)
        terms[0].backward()
        torch.save({"terms": terms.detach(), "grads": [t.grad for t in mine]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_losses_on_two_processes_equal_one_process_loss_and_gradient(tmp_path):
    z = [unit(16, 8, seed) for seed in range(4)]        # t x, t' x, a x, a' x of 16 images
    torch.multiprocessing.spawn(_objective_on_my_share, nprocs=2, args=(
        2, str(tmp_path / "rendezvous"), z, str(tmp_path / "share")))
    shares = [torch.load(tmp_path / f"share.{r}") for r in range(2)]
    whole = [t.clone().requires_grad_() for t in z]
    terms = care.objective(whole, cfg_for(group_size=4))
    terms[0].backward()
    # the mean over processes of each term (loss, InfoNCE, its halves, equivariance) ...
    assert torch.allclose((shares[0]["terms"] + shares[1]["terms"]) / 2, terms.detach(), atol=1e-6)
    # ... and DDP's average of the gradients are those of one process on the global batch
    for i in range(4):
        ddp = torch.cat([s["grads"][i] for s in shares]) / 2
        assert torch.allclose(ddp, whole[i].grad, atol=1e-6), i


def test_process_count_checks_run_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")           # set, but not by torchrun
    code, line = run_error(["--device", "cpu", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "WORLD_SIZE is 2, but RANK, LOCAL_RANK or MASTER_ADDR is not set" in line
    for k, v in dict(RANK="0", LOCAL_RANK="0", MASTER_ADDR="localhost").items():
        monkeypatch.setenv(k, v)                    # as torchrun --nproc_per_node=2 sets them
    for argv, words in ((["--batch-size", "3", "--group-size", "1"], "not divisible by the 2"),
                        (["--batch-size", "2", "--group-size", "1"], "leaves 1 image per process"),
                        (["--batch-size", "16", "--group-size", "16"], "on each of 2 processes"),
                        (["--sync-bn"], "--sync-bn needs CUDA")):
        code, line = run_error(argv + ["--device", "cpu", "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and line.startswith("care.py: error: process 0: ") and words in line


def torchrun(*args, script="care.py"):
    """`torchrun --standalone --nproc_per_node=2 care.py ARGS`, started in its own session
    (so that a signal reaches launcher and workers alike)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", script, *args], start_new_session=True,
                            cwd=HERE, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(p, timeout=180):
    """Wait for a torchrun; on a timeout kill launcher and workers together (a hang must
    not outlive the test) and fail."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return p.returncode, out, err


def processes_mentioning(text):
    """Live processes whose command line contains text (Linux /proc; elsewhere: none seen)."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(text).encode() in f.read():
                    found.append(pid)
        except OSError:                                 # ended while we looked
            pass
    return found


def test_torchrun_sigterm_keeps_the_last_epoch_and_the_run_resumes_there(tiny_folder, tmp_path):
    out = tmp_path / "run"
    p = torchrun(*tiny_args(tiny_folder, out, "--epochs", "500", "--knn-every", "2"))
    deadline = time.time() + 600
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)                       # to the launcher, as Ctrl-C would go
    code, stdout, _ = finish(p, timeout=60)             # every process ends within seconds
    assert "--resume" in stdout and "torchrun --nproc_per_node=2" in stdout
    assert not processes_mentioning(out)
    kept = torch.load(out / "checkpoint.pt")["epoch"]
    assert kept >= 1 and [r["epoch"] for r in read_json(out / "metrics.json")["epochs"]] == list(
        range(kept + 1))
    code, stdout, stderr = finish(torchrun("--resume", str(out / "checkpoint.pt"),
                                           "--epochs", str(kept + 1)))
    assert code == 0, stderr[-2000:]
    assert stdout.count("linear probe top-1") == 1               # process 0 speaks, once
    m = read_json(out / "metrics.json")
    assert m["world_size"] == 2 and [r["epoch"] for r in m["epochs"]] == list(range(kept + 2))
    assert m["epochs"][-1]["knn_top1"] is not None


def test_bad_input_under_torchrun_exits_on_every_process_with_one_line(tiny_folder, tmp_path):
    code, out, err = finish(torchrun(*tiny_args(tiny_folder, tmp_path / "bad"), "--batch-size",
                                     "16", "--group-size", "16"), timeout=120)
    # Each process refuses alike and says why, unless torchrun's agent has already ended it,
    # the moment the first one refused: one line or two, each naming its process.
    errors = [l for l in (out + err).splitlines() if "care.py: error:" in l]
    assert code != 0 and 1 <= len(errors) <= 2 and all(re.match(
        r"care.py: error: process [01]: --batch-size 16 is not a multiple of --group-size 16 on "
        r"each of 2 processes \(8 images each\)", e) for e in errors), errors
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("missing", ["the folder", "its train/ split"])
def test_under_torchrun_a_process_that_refuses_its_data_stops_the_others(missing, tiny_folder,
                                                                          tmp_path):
    # Process 1's data folder is missing (refused with its settings, before the processes
    # join) or has no train/ split (refused while loading, after they join): it says why,
    # and torchrun's agent ends process 0 at once (SIGTERM keeps its default action there).
    shutil.copytree(tiny_folder / "test", tmp_path / "half" / "test")
    root = tmp_path / ("none" if missing == "the folder" else "half")
    argv = [tiny_args(tiny_folder, tmp_path / "o", "--epochs", "1"),
            tiny_args(root, tmp_path / "o", "--epochs", "1")]
    (tmp_path / "by_rank.py").write_text(f"import os, sys\nsys.path.insert(0, {HERE!r})\nimport "
                                         f"care\ncare.main({argv!r}[int(os.environ['RANK'])])")
    start = time.time()
    code, out, err = finish(torchrun(script=str(tmp_path / "by_rank.py")), timeout=120)
    errors = [l for l in (out + err).splitlines() if "care.py: error:" in l]
    assert code != 0 and time.time() - start < 60 and len(errors) == 1, errors
    assert errors[0].startswith("care.py: error: process 1: ") and (
        "does not exist" in errors[0] if missing == "the folder" else "no train/" in errors[0])


# -------------------------------------------------------------------------- speed
def test_benchmark_writes_consistent_json(tmp_path, monkeypatch):
    seen, step = set(), care.train_step                 # what each timed kind ran

    def recording(model, optimizer, images, cfg, generator, aug, machine):
        seen.add((cfg.method, str(machine.dtype), str(machine.memory_format), cfg.compile,
                  isinstance(aug, care.functools.partial)))
        return step(model, optimizer, images, cfg, generator, aug, machine)
    monkeypatch.setattr(care, "train_step", recording)
    monkeypatch.setattr(care, "BENCH_WARMUP", 1)
    monkeypatch.setattr(care, "BENCH_STEPS", 2)
    r = care.main(["--benchmark", "--device", "cpu", "--batch-size", "8", "--group-size", "4",
                   "--image-size", "8", "--precision", "bf16", "--out", str(tmp_path)])
    fast = ("torch.bfloat16", "torch.channels_last")
    plain = ("torch.float32", "torch.contiguous_format")
    assert seen == {("care", *fast, False, True), ("simclr", *fast, False, True),
                    ("care", *fast, False, False),                  # bare: ready-made views
                    ("care", *plain, False, True)}                  # fp32: speed settings off
    j = read_json(tmp_path / "benchmark.json")
    assert j["care_step_s"] == r["care_step_s"]
    assert j["overhead_ratio"] == pytest.approx(j["care_step_s"] / j["bare_step_s"])
    assert j["care_simclr_ratio"] == pytest.approx(j["care_step_s"] / j["simclr_step_s"])
    assert j["images_per_s"] == pytest.approx(8 / j["care_step_s"])
    assert j["speedup_vs_fp32"] == pytest.approx(j["fp32_step_s"] / j["care_step_s"])
    assert j["host_syncs"] is None and j["precision"] == "bfloat16"
    assert min(j["care_step_s"], j["bare_step_s"], j["simclr_step_s"]) > 0
    assert j["device"].startswith("cpu") and j["config"]["batch_size"] == 8


# ---------------------------------------------------------------- the file's layout
def test_part_one_is_the_pure_method_and_comes_first():
    lines = open(care.__file__).read().splitlines()
    banner = next(i for i, l in enumerate(lines, 1) if l.startswith("# Part II, the machinery"))
    assert banner <= 450 and f"It ends at line {banner}, the banner" in care.__doc__
    part_one = "\n".join(lines[:banner])
    method = part_one[part_one.index("# Part I, the method"):]
    for word in ("dist.", "autocast", "channels_last", "memory_format"):
        assert word not in method, f"Part I mentions {word}"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef):
            assert node.end_lineno - node.lineno < 50, f"{node.name} is over 50 lines"


# -------------------------------------------------------------------------- robustness
def run_error(argv, capsys):
    """main(argv) must exit non-zero with exactly one line on stderr, before training."""
    with pytest.raises(SystemExit) as e:
        care.main(argv)
    captured = capsys.readouterr()
    run_error.stdout = captured.out
    err = [l for l in captured.err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("care.py: error:"), err
    return e.value.code, err[0]


@pytest.mark.parametrize("argv,words", [
    (["--batch-size", "100", "--group-size", "16"], "100 is not a multiple of --group-size 16"),
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--lam", "-0.1"], "--lam must be >= 0"),
    (["--dataset", "folder", "--data-root", "/no/such/folder"], "does not exist"),
    (["--resume", "/no/such/checkpoint.pt"], "no such file"),
    (["--eval-only"], "needs --resume"),
    (["--batch-size", "many"], "invalid int value"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--knn-every", "0"], "--knn-every must be >= 1"),
    (["--benchmark", "--method", "simclr", "--batch-size", "100"], "not a multiple"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--image-size", "100000"], "--image-size must be >= 4 and <= 1024, got 100000 (care.py "
                                 "holds every image on the device as uint8"),
    (["--lam", "inf"], "--lam must be >= 0, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0, got inf"),
    (["--temperature", "inf"], "--temperature must be > 0, got inf"),
    (["--lr", "inf"], "--lr must be > 0, got inf"),
    (["--temperature", "nan"], "--temperature must be > 0, got nan"),
    (["--seed", str(2**70)], "--seed must be >= 0 and <= 9223372036854775807"),
    (["--data-root", "care.py"], "--data-root care.py is a file; it must be a folder"),
    (["--resume", "."], "--resume . is a folder: pass the checkpoint.pt in it (it has none)"),
])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys, tmp_path):
    code, line = run_error(argv + ["--out", str(tmp_path / "run")], capsys)
    assert code == 2 and words in line
    assert not (tmp_path / "run").exists()                      # failed before any work


def test_cuda_without_cuda_is_a_clear_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, line = run_error(["--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device cpu" in line


def test_folder_without_split_or_images(tmp_path, capsys):
    (tmp_path / "a" / "test" / "cat").mkdir(parents=True)
    code, line = run_error(tiny_args(tmp_path / "a", tmp_path / "o1"), capsys)
    assert code == 2 and "has no train/ folder" in line
    (tmp_path / "a" / "train" / "cat").mkdir(parents=True)
    code, line = run_error(tiny_args(tmp_path / "a", tmp_path / "o2"), capsys)
    assert code == 2 and "cannot read images in" in line and "no valid file" in line


def test_offline_download_says_what_to_do(monkeypatch, tmp_path, capsys):
    class Offline:
        def __init__(self, root, download=False, **kw):
            if not download:
                raise RuntimeError("Dataset not found or corrupted.")
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(care.torchvision.datasets, "CIFAR10", Offline)
    code, line = run_error(["--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                            "--device", "cpu", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "download" in line and "--dataset folder" in line


def unwritable_outs(tmp_path):
    """--out paths that cannot take a file: a file itself, a path under a file, too long."""
    (tmp_path / "afile").write_text("")
    return [tmp_path / "afile", tmp_path / "afile" / "run", tmp_path / ("x" * 300)]


def test_an_out_that_cannot_be_written_is_one_line_in_every_mode(tiny_folder, trained, tmp_path,
                                                                  capsys, monkeypatch):
    modes = [tiny_args(tiny_folder, "OUT"), ["--exercise", "info_nce", "--out", "OUT"],
             ["--augmentations", "--dataset", "folder", "--data-root", str(tiny_folder),
              "--out", "OUT"], ["--compare", str(trained), "--out", "OUT"]]
    for out in unwritable_outs(tmp_path):
        for argv in modes:
            code, line = run_error([str(out) if a == "OUT" else a for a in argv], capsys)
            assert code == 2 and f"--out {out}: cannot write there" in line, (argv, line)

    def read_only(dir=None):                        # root writes anywhere: a refusal instead
        raise PermissionError(13, "Permission denied", dir)
    monkeypatch.setattr(care.tempfile, "TemporaryFile", read_only)
    code, line = run_error(tiny_args(tiny_folder, tmp_path / "ro"), capsys)
    assert code == 2 and "cannot write there (Permission denied)" in line


def test_an_out_that_stops_taking_files_mid_run_keeps_the_last_epoch(tiny_folder, tmp_path,
                                                                      capsys, monkeypatch):
    saves, save = [], torch.save

    def full_disk_at_epoch_2(obj, f):               # as torch.save reports a failed write
        saves.append(obj["epoch"])
        if obj["epoch"] == 2:
            raise RuntimeError(f"File {f} cannot be opened.")
        save(obj, f)
    monkeypatch.setattr(care.torch, "save", full_disk_at_epoch_2)
    out = tmp_path / "run"
    code, line = run_error(tiny_args(tiny_folder, out, "--epochs", "3"), capsys)
    assert code == 1 and f"cannot write {out}/checkpoint.pt" in line and saves == [1, 2]
    assert f"keep epoch 1; go on with: python care.py --resume {out}/checkpoint.pt" in line
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_json(out / "metrics.json")["epochs"]] == [0, 1]


def test_compare_names_the_record_it_cannot_use(trained, tmp_path, capsys):
    bad = {"corrupt": "{bad", "truncated": '{"config": {"method": "care"', "a-list": "[1, 2]",
           "no-config": '{"epochs": [{"epoch": 0}], "device": "cpu", "wall_time_s": 1}',
           "no-rows": read_json(trained / "metrics.json") | {"epochs": []}}
    for name, text in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text if isinstance(text, str) else
                                                     care.json.dumps(text))
        code, line = run_error(["--compare", str(trained), str(tmp_path / name), "--out",
                                str(tmp_path / "cmp")], capsys)
        assert code == 2 and f"{tmp_path / name}/metrics.json" in line, (name, line)
    code, line = run_error(["--compare", str(tmp_path / "nothing"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "cannot read" in line and "No such file" in line
    code, line = run_error(["--compare", str(trained), str(trained) + "/", "--out", str(tmp_path)],
                           capsys)
    assert code == 2 and "lists a folder twice" in line
    assert not (tmp_path / "cmp").exists()


def test_image_folders_a_user_should_not_have_made(tiny_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "data"
    shutil.copytree(tiny_folder, folder)
    (folder / "test" / "extra").mkdir()
    shutil.copy(next((folder / "test" / "class0").iterdir()), folder / "test" / "extra")
    code, line = run_error(tiny_args(folder, tmp_path / "o"), capsys)
    assert code == 2 and "has class extra, which" in line and "train/ lacks" in line
    shutil.rmtree(folder / "test" / "extra")
    code, line = run_error(tiny_args(folder, tmp_path / "o", "--train-subset", "1000"), capsys)
    assert code == 2 and "--train-subset 1000, but the training split has 72 images" in line
    from PIL import Image                           # a picture larger than PIL dares decode:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 144 pixels > 2 x 50, a "bomb"
    code, line = run_error(tiny_args(folder, tmp_path / "o"), capsys)
    assert code == 1 and "cannot decode" in line and "decompression bomb" in line
    monkeypatch.undo()

    def unreadable(directory):
        raise PermissionError(13, "Permission denied", directory)
    monkeypatch.setattr(care.torchvision.datasets.folder, "find_classes", unreadable)
    code, line = run_error(tiny_args(folder, tmp_path / "o"), capsys)
    assert code == 2 and "cannot read images in" in line and "Permission denied" in line


def test_a_channel_that_never_varies_trains_and_measures_finite(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 16), ("test", 8)):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):                      # blue is 40 in every pixel of every image
                img = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8)
                img[..., 2] = 40
                Image.fromarray(img.numpy()).save(tmp_path / split / f"c{c}" / f"{i}.png")
    m = care.main(tiny_args(tmp_path, tmp_path / "run", "--epochs", "1"))
    assert m["data_std"][2] == round(1 / 255, 4) and math.isfinite(m["linear_top1"])
    assert all(math.isfinite(m["diagnostics"][k]) for k in ("gram_error", "procrustes_residual"))


def test_checkpoints_care_py_did_not_write_are_one_line(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    cases = {"config not a table": {**ckpt, "config": [1, 2]},
             "no optimizer": {k: v for k, v in ckpt.items() if k != "optimizer"},
             "no lam": {**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "lam"}},
             "unknown arch": {**ckpt, "config": {**ckpt["config"], "arch": "vgg11"}},
             "other weights": {**ckpt, "config": {**ckpt["config"], "feature_dim": 64}}}
    for name, words in (("config not a table", "it has no table of settings"),
                        ("no optimizer", "it lacks optimizer"), ("no lam", "it lacks lam"),
                        ("unknown arch", "its --arch vgg11 is none of resnet18"),
                        ("other weights", "its weights do not fit its settings")):
        torch.save(cases[name], tmp_path / "c.pt")
        for argv in (["--resume", str(tmp_path / "c.pt")],
                     ["--resume", str(tmp_path / "c.pt"), "--eval-only"]):
            code, line = run_error(argv, capsys)
            assert code == 2 and f"not a care.py checkpoint: {words}" in line, (name, line)
    code, line = run_error(["--resume", str(trained / "metrics.json")], capsys)
    assert code == 2 and "not a checkpoint.pt of care.py" in line and "weights_only" not in line
    code, line = run_error(["--resume", str(trained)], capsys)
    assert code == 2 and f"is a folder: pass the checkpoint.pt in it, {trained}/checkpoint.pt" \
        in line


def test_resume_refuses_fewer_epochs_than_trained(trained, tmp_path, capsys):
    ckpt = copy_run(trained, tmp_path)
    before = (tmp_path / "run" / "metrics.json").read_text()
    code, line = run_error(["--resume", ckpt, "--epochs", "1"], capsys)
    assert code == 2 and "this run has trained 2 epochs" in line and "--eval-only" in line
    assert (tmp_path / "run" / "metrics.json").read_text() == before


def test_sigterm_in_the_final_evaluation_says_how_to_finish(trained, tmp_path, capsys, monkeypatch):
    ckpt = copy_run(trained, tmp_path)

    def sigterm(cfg, run):
        raise KeyboardInterrupt                     # main turns SIGTERM into this
    monkeypatch.setattr(care, "evaluate_run", sigterm)
    with pytest.raises(SystemExit) as e:
        care.main(["--resume", ckpt])
    words = f"interrupted during the final evaluation: {ckpt} and metrics.json keep epoch 2; " \
            f"evaluate it with: python care.py --resume {ckpt} --eval-only"
    assert e.value.code == 130 and words in capsys.readouterr().out
    assert words in (tmp_path / "run" / "train.log").read_text()
    assert torch.load(ckpt)["epoch"] == 2 and len(read_json(tmp_path / "run" / "metrics.json")[
        "epochs"]) == 3


def test_a_second_run_into_a_folder_in_use_is_refused(tiny_folder, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "train.log", "a") as log:       # as a run still going holds it
        fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, line = run_error(tiny_args(tiny_folder, out, "--epochs", "1"), capsys)
    assert code == 2 and f"{out} is in use by another care.py run" in line
    assert not (out / "metrics.json").exists()
