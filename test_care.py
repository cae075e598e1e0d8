"""The executable spec of care.py: run `python -m pytest -q` (CPU, no network, < 4 min).

Each test states one promise of the method or of the tool. The loss tests use toy tensors
and the algebra of the derivation in care.py: a wrong loss fails them.
"""
import pytest
import torch
import torchvision.transforms.functional as TF

import care

torch.set_num_threads(2)


def random_orthogonal(d, generator=None):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()      # Haar-distributed


def unit(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)


# ------------------------------------------------------------------ equivariance_loss
def naive_equivariance_loss(z1, z2, n):
    groups = z1.shape[0] // n
    total = 0.0
    for k in range(groups):
        a, b = z1[k * n:(k + 1) * n], z2[k * n:(k + 1) * n]
        s = sum((float(a[i] @ a[j]) - float(b[i] @ b[j])) ** 2
                for i in range(n) for j in range(n) if i != j)
        total += 2 / n * s
    return total / groups


def test_equivariance_zero_under_one_rotation():
    z = unit(32, 8)
    R = random_orthogonal(8)
    assert care.equivariance_loss(z, z @ R.T, group_size=8) < 1e-6


def test_equivariance_zero_with_a_rotation_per_group():
    z, n = unit(32, 8), 8
    z2 = torch.cat([z[k * n:(k + 1) * n] @ random_orthogonal(8).T for k in range(4)])
    assert care.equivariance_loss(z, z2, group_size=n) < 1e-6


def test_equivariance_positive_for_non_orthogonal_map():
    z = unit(32, 8)
    A = torch.eye(8) + 0.5 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    assert care.equivariance_loss(z, z @ A.T, group_size=8) > 0.1
    # a rotation followed by renormalised non-uniform scaling is not a rotation either
    z2 = torch.nn.functional.normalize(z @ torch.diag(torch.linspace(0.2, 2, 8)), dim=1)
    assert care.equivariance_loss(z, z2, group_size=8) > 1e-2


def test_equivariance_invariant_to_global_rotation_of_both_views():
    z1, z2 = unit(32, 8, 0), unit(32, 8, 1)
    Q = random_orthogonal(8)
    before = care.equivariance_loss(z1, z2, 8)
    assert torch.allclose(care.equivariance_loss(z1 @ Q.T, z2 @ Q.T, 8), before, atol=1e-6)


def test_equivariance_invariant_to_consistent_permutation_inside_group():
    z1, z2, n = unit(32, 8, 0), unit(32, 8, 1), 8
    perm = torch.cat([k * n + torch.randperm(n) for k in range(4)])
    before = care.equivariance_loss(z1, z2, n)
    assert torch.allclose(care.equivariance_loss(z1[perm], z2[perm], n), before, atol=1e-6)
    # ...but permuting only one view changes it: the loss does pair image i with image i
    assert not torch.allclose(care.equivariance_loss(z1[perm], z2, n), before, atol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 4, 12])
def test_equivariance_matches_naive_loop(n):
    z1, z2 = torch.randn(12, 5), torch.randn(12, 5)            # not even unit norm
    assert care.equivariance_loss(z1, z2, n).item() == pytest.approx(
        naive_equivariance_loss(z1, z2, n), rel=1e-5, abs=1e-6)


def test_equivariance_ragged_batch_is_an_error():
    with pytest.raises(ValueError, match="10.*4"):
        care.equivariance_loss(unit(10, 4), unit(10, 4), group_size=4)


# ---------------------------------------------------------------------------- info_nce
def naive_info_nce(z1, z2, tau):
    z = torch.cat([z1, z2])
    B, losses = z1.shape[0], []
    for i in range(2 * B):
        p = (i + B) % (2 * B)
        others = [k for k in range(2 * B) if k != i]
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in others)
        losses.append(-torch.log(torch.exp(z[i] @ z[p] / tau) / den))
    return torch.stack(losses).mean()


def test_info_nce_matches_naive_loop():
    z1, z2 = unit(6, 4, 0), unit(6, 4, 1)
    for tau in (0.1, 0.5, 1.0):
        assert torch.allclose(care.info_nce(z1, z2, tau), naive_info_nce(z1, z2, tau), atol=1e-5)


def test_info_nce_symmetric_and_rotation_invariant():
    z1, z2 = unit(16, 8, 0), unit(16, 8, 1)
    loss = care.info_nce(z1, z2, 0.5)
    assert torch.allclose(care.info_nce(z2, z1, 0.5), loss, atol=1e-6)
    Q = random_orthogonal(8)
    assert torch.allclose(care.info_nce(z1 @ Q.T, z2 @ Q.T, 0.5), loss, atol=1e-5)


def test_info_nce_prefers_aligned_positives():
    z1 = unit(64, 16, 0)
    aligned = care.info_nce(z1, z1, 0.5)
    noisy = care.info_nce(z1, torch.nn.functional.normalize(z1 + 0.3 * unit(64, 16, 2)), 0.5)
    unrelated = care.info_nce(z1, unit(64, 16, 1), 0.5)
    assert aligned < noisy < unrelated


# ----------------------------------------------------------------------------- augment
def images(B=8, H=16, seed=0):
    return torch.rand(B, 3, H, H, generator=torch.Generator().manual_seed(seed))


def test_augment_identical_images_in_a_group_get_identical_views():
    x = images(2).repeat_interleave(4, 0)         # groups of 4 copies of one image
    v = care.augment(x, group_size=4, generator=torch.Generator().manual_seed(0))
    for k in range(2):
        group = v[4 * k:4 * k + 4]
        assert torch.allclose(group, group[:1].expand_as(group))
    assert not torch.allclose(v[0], v[4])


def test_augment_groups_draw_different_parameters():
    x = images(1).expand(16, -1, -1, -1).contiguous()      # one image, 8 groups of 2
    v = care.augment(x, group_size=2, generator=torch.Generator().manual_seed(0))
    distinct = {tuple(v[i].flatten()[:50].tolist()) for i in range(0, 16, 2)}
    assert len(distinct) == 8


def test_augment_group_size_one_gives_per_image_views_and_fresh_calls():
    x = images(1).expand(8, -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    v = care.augment(x, group_size=1, generator=g)
    assert len({tuple(v[i].flatten()[:50].tolist()) for i in range(8)}) == 8
    assert not torch.allclose(v, care.augment(x, group_size=1, generator=g))


def test_augment_keeps_shape_dtype_device_and_is_seeded():
    x = images(6, H=12)
    v = care.augment(x, 3, torch.Generator().manual_seed(5))
    assert v.shape == x.shape and v.dtype == x.dtype and v.device == x.device
    assert torch.equal(v, care.augment(x, 3, torch.Generator().manual_seed(5)))


def test_augment_ragged_batch_is_an_error():
    with pytest.raises(ValueError, match="10.*4"):
        care.augment(images(10), group_size=4)


@pytest.mark.parametrize("op,factor", [("brightness", 1.3), ("brightness", 0.6),
                                       ("contrast", 0.7), ("contrast", 1.4),
                                       ("saturation", 0.6), ("saturation", 1.4),
                                       ("hue", 0.1), ("hue", -0.1), ("hue", 0.5)])
def test_colour_ops_match_torchvision(op, factor):
    x = images(4)
    ours = getattr(care, f"adjust_{op}")(x, torch.full((4, 1, 1, 1), factor) if op != "hue"
                                         else torch.full((4,), factor))
    ref = getattr(TF, f"adjust_{op}")(x, factor)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_grayscale_and_blur_match_torchvision():
    x = images(4)
    assert torch.allclose(care.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)
    for sigma in (0.1, 0.8, 2.0):
        ours = care.gaussian_blur(x, torch.full((4,), sigma))
        assert torch.allclose(ours, TF.gaussian_blur(x, [3, 3], [sigma, sigma]), atol=1e-6)


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


def test_augment_single_group_fixed_parameters_match_torchvision_pipeline(monkeypatch):
    # Force one set of parameters (no crop change, no flip, jitter on, no gray, no blur)
    # and compare the whole pipeline with torchvision's functional ops applied in order.
    x = images(4)
    u = torch.tensor([1.0] * 10 + [0.5] * 10 + [0.0, 0.0] + [0.9]
                     + [0.25, 0.75, 0.5, 0.75] + [0.1, 0.9, 0.9, 0.0])
    monkeypatch.setattr(care.torch, "rand", lambda *a, **k: u.view(1, 31).clone())
    ours = care.augment(x, group_size=4)
    b, c, s, h = 0.6 + 0.8 * 0.25, 0.6 + 0.8 * 0.75, 0.6 + 0.8 * 0.5, -0.1 + 0.2 * 0.75
    ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(
        TF.adjust_brightness(x, b), c), s), h)
    ref = TF.normalize(ref, care.CIFAR10_MEAN, care.CIFAR10_STD)
    assert torch.allclose(ours, ref, atol=1e-4)


# ----------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet50", 2048)])
def test_encoder_outputs(arch, width):
    model = care.Encoder(arch, feature_dim=32).eval()
    h, z = model(torch.randn(3, 3, 16, 16))
    assert h.shape == (3, width) and model.dim == width and z.shape == (3, 32)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.backbone.conv1.stride == (1, 1)


def test_encoder_rejects_unknown_arch():
    with pytest.raises(ValueError, match="resnet18"):
        care.Encoder("vgg11")


def test_a_few_care_steps_lower_the_loss_on_cpu():
    torch.manual_seed(0)
    model = care.Encoder("resnet18", feature_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = images(16, H=8)
    g = torch.Generator().manual_seed(0)

    def care_loss():
        views = [care.augment(x, 1, g), care.augment(x, 1, g),
                 care.augment(x, 4, g), care.augment(x, 4, g)]
        _, z = model(torch.cat(views))
        z = z.chunk(4)
        return care.info_nce(z[0], z[1], 0.5) + 0.03 * care.equivariance_loss(z[2], z[3], 4)

    losses = []
    for _ in range(8):
        loss = care_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
