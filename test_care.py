"""The executable spec of care.py: run `python -m pytest -q` (CPU, no network, < 4 min).

Each test states one promise of the method or of the tool. The loss tests use toy tensors
and the algebra of the derivation in care.py: a wrong loss fails them.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision.transforms.functional as TF

import care



def random_orthogonal(d, generator=None):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()      # Haar-distributed


def unit(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)


def cfg_for(**change):
    """The settings of a default run (CPU), with some changed: what train_step reads."""
    return argparse.Namespace(**{**{k: s.default for k, s in care.SETTINGS.items()},
                                 "device": "cpu", **change})


def configure(argv):
    """care.configure on a command line, as main() calls it."""
    return care.configure(vars(care.build_parser().parse_args(argv)))


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


def test_alignment_and_uniformity_match_naive_loops_and_sum_to_info_nce():
    z1, z2 = unit(6, 4, 0), unit(6, 4, 1)
    for tau in (0.1, 0.5):
        align, unif = care.alignment_uniformity(z1, z2, tau)
        n_align, n_unif, rest = naive_halves(z1, z2, tau)
        assert torch.allclose(align, n_align, atol=1e-5) and torch.allclose(unif, n_unif, atol=1e-5)
        # the exact relation of the derivation comment: info_nce = alignment + uniformity + rest
        assert torch.allclose(care.info_nce(z1, z2, tau), align + unif + rest, atol=1e-5)
        assert rest > 0


def test_halves_invariant_to_global_rotation():
    z1, z2 = unit(16, 8, 0), unit(16, 8, 1)
    Q = random_orthogonal(8)
    for a, b in zip(care.alignment_uniformity(z1, z2), care.alignment_uniformity(z1 @ Q.T, z2 @ Q.T)):
        assert torch.allclose(a, b, atol=1e-5)


def test_uniformity_alone_trains_and_is_what_it_lowers():
    torch.manual_seed(0)
    model = care.Encoder("resnet18", feature_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = cfg_for(method="care", contrastive="uniformity", lam=0.03, group_size=4)
    x = (images(16, H=8) * 255).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    rows = [care.train_step(model, opt, x, cfg, g) for _ in range(8)]
    loss, unif, equi = (torch.stack([r[care.TERMS.index(k)] for r in rows])
                        for k in ("loss", "uniformity", "equivariance"))
    assert torch.allclose(loss, unif + 0.03 * equi)               # no alignment in the loss
    assert unif[-3:].mean() < unif[:3].mean()


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


@pytest.mark.parametrize("kernel", [3, 5, 23])
def test_blur_matches_torchvision(kernel):
    x = images(4, H=32)
    for sigma in (0.1, 0.8, 2.0):
        ours = care.gaussian_blur(x, torch.full((4,), sigma), kernel)
        assert torch.allclose(ours, TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma]), atol=1e-5)
    # one sigma per image: each image blurred by its own
    sigmas = torch.tensor([0.3, 1.0, 1.7, 2.0])
    ours = care.gaussian_blur(x, sigmas, kernel)
    for i, s in enumerate(sigmas.tolist()):
        assert torch.allclose(ours[i], TF.gaussian_blur(x[i], [kernel, kernel], [s, s]), atol=1e-5)


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


def test_augment_single_group_fixed_parameters_match_torchvision_pipeline(monkeypatch):
    # Force one set of parameters (no crop change, no flip, jitter on, no gray, no blur)
    # and compare the whole pipeline with torchvision's functional ops applied in order.
    x = images(4)
    u = torch.tensor([1.0] * 10 + [0.5] * 10 + [0.0, 0.0] + [0.9]
                     + [0.25, 0.75, 0.5, 0.75] + [0.1, 0.9, 0.9, 0.0])
    monkeypatch.setattr(care.torch, "rand", lambda *shape, **k: u.expand(*shape).clone())
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


def test_imagenet_stem_shrinks_4x_before_the_blocks_and_cifar_stem_does_not():
    inner = {}
    for stem in ("cifar", "imagenet"):
        model = care.Encoder("resnet18", feature_dim=8, stem=stem).eval()
        model.backbone.layer1.register_forward_hook(lambda m, i, o, s=stem: inner.update({s: o.shape}))
        h, z = model(torch.randn(2, 3, 64, 64))
        assert h.shape == (2, 512) and z.shape == (2, 8)
    assert inner["cifar"][-2:] == (64, 64) and inner["imagenet"][-2:] == (16, 16)
    assert care.Encoder(stem="imagenet").backbone.conv1.kernel_size == (7, 7)


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
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
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
    g = torch.Generator().manual_seed(0)
    x = (images(16, H=8) * 255).to(torch.uint8)
    rows = [care.train_step(net, opt, x, cfg, g, care.augment, machine) for _ in range(3)]
    assert all(torch.isfinite(r).all() for r in rows)


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


def read_json(path):
    import json
    with open(path) as f:
        return json.load(f)


def test_load_folder_holds_uint8_splits_with_labels_and_subset(tiny_folder):
    d = care.load_data("folder", str(tiny_folder), 8, train_subset=10)
    assert d.train_x.shape == (10, 3, 8, 8) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (24, 3, 8, 8) and d.classes == ["class0", "class1", "class2"]
    assert sorted(d.test_y.tolist()) == [0] * 8 + [1] * 8 + [2] * 8
    again = care.load_data("folder", str(tiny_folder), 8, train_subset=10)
    assert torch.equal(d.train_x, again.train_x)                  # the subset is fixed


def test_knn_and_linear_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.randn(4, 16, generator=g)
    y_train, y_test = torch.arange(200) % 4, torch.arange(40) % 4
    x_train = centres[y_train] + torch.randn(200, 16, generator=g)
    x_test = centres[y_test] + torch.randn(40, 16, generator=g)
    assert care.knn_top1(x_train, y_train, x_test, y_test, k=20) == 100.0
    assert care.linear_probe(x_train, y_train, x_test, y_test, epochs=300) == 100.0
    shuffled = y_train[torch.randperm(200, generator=g)]          # labels carry no signal
    assert care.knn_top1(x_train, shuffled, x_test, y_test, k=20) < 60


def test_end_to_end_care_run_writes_the_record(tiny_folder, tmp_path):
    metrics = care.main(tiny_args(tiny_folder, tmp_path / "care", "--epochs", "2"))
    on_disk = read_json(tmp_path / "care" / "metrics.json")
    assert on_disk["linear_top1"] == metrics["linear_top1"] and on_disk["world_size"] == 1
    assert on_disk["config"]["method"] == "care" and on_disk["device"].startswith("cpu")
    assert on_disk["wall_time_s"] > 0
    rows = on_disk["epochs"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] is None and rows[0]["knn_top1"] is not None
    for r in rows[1:]:
        assert set(r) >= {"loss", "info_nce", "alignment", "uniformity", "equivariance",
                          "knn_top1", "images_per_s", "seconds"}
        assert r["loss"] == pytest.approx(r["info_nce"] + 0.03 * r["equivariance"], rel=1e-4)
        assert r["info_nce"] > r["alignment"] + r["uniformity"]     # the remainder is positive
    geometry = {"gram_error", "identity_residual", "procrustes_residual", "linear_residual",
                "rotation_angle_deg", "hue_cosine", "hue_cosine_z", "colour_probe_top1",
                "colour_probe_top1_z"}
    for r in rows:                                  # measured with kNN, every epoch here
        assert set(r) >= geometry and r["pairs"] == 2
    d = on_disk["diagnostics"]
    assert set(d) >= geometry and d["pairs"] == 8
    assert list(d["hue_cosine"]) == list(d["hue_cosine_z"]) == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    assert list(d["by_family"]) == list(care.FAMILIES)
    assert len(d["gram_matrices"]["G"]) == 16 and d["gram_matrices"]["G"][3][3] == pytest.approx(1)
    assert 0 <= d["rotation_angle_deg"] <= 180
    assert d["linear_residual"] <= d["procrustes_residual"] + 1e-9
    assert d["procrustes_residual"] <= d["identity_residual"] + 1e-9
    for f in ("checkpoint.pt", "train.log", "curves.png", "geometry.png"):
        assert (tmp_path / "care" / f).stat().st_size > 0
    assert "linear probe top-1" in (tmp_path / "care" / "train.log").read_text()


def test_load_encoder_gives_the_runs_own_features(tiny_folder, tmp_path):
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1"))
    last = read_json(tmp_path / "run" / "metrics.json")["epochs"][-1]
    encoder = care.load_encoder(str(tmp_path / "run" / "checkpoint.pt"))
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


def test_uniformity_run_records_both_halves_and_reference_linear_eval(tiny_folder, tmp_path):
    m = care.main(tiny_args(tiny_folder, tmp_path / "u", "--epochs", "1", "--contrastive",
                            "uniformity", "--linear-eval", "reference"))
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


def test_simclr_run_and_compare(tiny_folder, tmp_path, capsys):
    care.main(tiny_args(tiny_folder, tmp_path / "care", "--epochs", "1"))
    care.main(tiny_args(tiny_folder, tmp_path / "simclr", "--epochs", "1", "--method", "simclr"))
    m = read_json(tmp_path / "simclr" / "metrics.json")
    assert m["config"]["lam"] == 0 and m["epochs"][1]["equivariance"] is None
    assert m["epochs"][1]["loss"] == pytest.approx(m["epochs"][1]["info_nce"])
    capsys.readouterr()
    care.main(["--compare", str(tmp_path / "care"), str(tmp_path / "simclr"),
               "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    assert "\ncare " in table and "\nsimclr " in table and "Gram err" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    # runs that differ only by seed are one group: mean +- spread
    care.main(tiny_args(tiny_folder, tmp_path / "care1", "--epochs", "1", "--seed", "1"))
    capsys.readouterr()
    care.main(["--compare", str(tmp_path / "care"), str(tmp_path / "care1"),
               str(tmp_path / "simclr"), "--out", str(tmp_path / "cmp")])
    lines = capsys.readouterr().out.splitlines()
    pooled = next(l for l in lines if l.startswith("care "))
    assert pooled.split()[2] == "2" and "+-" in pooled           # label, lam, seeds


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        care.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = set(re.findall(r"^  (--[a-z-]+)", text, re.M)) | {"--help"}
    assert flags == {"--" + k.replace("_", "-") for k, s in care.SETTINGS.items() if s.flag} | {
        "--help"} and len(flags) <= 32
    assert "stl10       --lam 0.01 --group-size 32 --optimizer sgd --lr 0.06" in text
    assert "(default: None)" not in text


@pytest.mark.parametrize("dataset,expected", [
    ("cifar10", dict(lam=0.03, group_size=16, optimizer="adam", lr=1e-3, weight_decay=1e-6,
                     lr_schedule="constant")),
    ("folder", dict(lam=0.03, group_size=16, optimizer="adam", lr=1e-3, weight_decay=1e-6)),
    ("cifar100", dict(lam=0.001, group_size=64, optimizer="adam", lr=1e-3)),
    ("stl10", dict(lam=0.01, group_size=32, optimizer="sgd", lr=0.06, weight_decay=5e-4,
                   lr_schedule="cosine", warmup_epochs=10)),
])
def test_recipe_by_dataset_and_typed_flags_win(dataset, expected, tmp_path):
    base = ["--dataset", dataset, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    cfg, _ = configure((base))
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.temperature == 0.5 and cfg.batch_size == 256
    cfg, _ = configure((base + ["--lam", "0.2", "--lr", "0.5",
                                                              "--group-size", "8"]))
    assert (cfg.lam, cfg.lr, cfg.group_size) == (0.2, 0.5, 8)
    assert cfg.optimizer == expected["optimizer"]               # the rest of the recipe stays


def test_stl10_offline_prints_its_recipe_before_the_download_error(monkeypatch, tmp_path, capsys):
    class Offline:
        def __init__(self, root, download=False, **kw):
            raise RuntimeError("Dataset not found.") if not download else OSError("no network")
    monkeypatch.setattr(care.torchvision.datasets, "STL10", Offline)
    code, line = run_error(["--dataset", "stl10", "--data-root", str(tmp_path / "empty"),
                            "--device", "cpu", "--out", str(tmp_path / "o")], capsys)
    out = run_error.stdout
    assert code == 1 and "could not download stl10" in line
    for flag in ("--lam 0.01", "--group-size 32", "--optimizer sgd", "--lr 0.06",
                 "--weight-decay 0.0005", "--lr-schedule cosine"):
        assert flag in out, flag


def test_resumed_run_keeps_its_checkpoint_settings_over_the_recipe(tiny_folder, tmp_path):
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1", "--lr", "0.002"))
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    cfg, _ = configure((["--resume", ckpt, "--epochs", "2"]))
    assert cfg.lr == 0.002 and cfg.group_size == 4 and cfg.lam == 0.03


# -------------------------------------------------------------- geometry diagnostics
def test_procrustes_recovers_a_known_rotation():
    Z = unit(512, 16)
    r = care.residuals(Z, Z @ random_orthogonal(16).T)
    assert r["procrustes_residual"] < 1e-10 and r["linear_residual"] < 1e-10
    assert r["identity_residual"] > 0.5


@pytest.mark.parametrize("seed", range(4))
def test_residuals_are_ordered_linear_rotation_identity(seed):
    g = torch.Generator().manual_seed(seed)
    Z = unit(256, 8, seed)
    Z2 = torch.nn.functional.normalize(Z @ torch.randn(8, 8, generator=g)
                                       + 0.3 * torch.randn(256, 8, generator=g), dim=1)
    r = care.residuals(Z, Z2)
    assert r["linear_residual"] <= r["procrustes_residual"] + 1e-12
    assert r["procrustes_residual"] <= r["identity_residual"] + 1e-12


def plane_rotation(d, degrees):
    """A rotation of R^d (d even) turning every coordinate plane (2k, 2k+1) by `degrees`."""
    c, s = torch.cos(torch.tensor(degrees).deg2rad()), torch.sin(torch.tensor(degrees).deg2rad())
    return torch.block_diag(*[torch.stack([torch.stack([c, -s]), torch.stack([s, c])])] * (d // 2))


def test_rotation_angle_is_zero_for_identical_views_and_recovers_a_known_angle():
    Z = unit(512, 16).double()
    assert care.rotation_angle_deg(Z, torch.eye(16, dtype=Z.dtype)) < 1e-3
    for degrees in (5.0, 30.0, 90.0):
        R = plane_rotation(16, degrees).double()
        assert care.rotation_angle_deg(Z, R.T) == pytest.approx(degrees, abs=1e-3)
        assert care.residuals(Z, Z @ R.T)["procrustes_residual"] < 1e-10


def test_hue_cosines_come_from_turned_images(tiny_folder):
    data = care.load_data("folder", str(tiny_folder), 8)
    torch.manual_seed(0)
    d = care.colour_diagnostics(care.Encoder(feature_dim=16).eval(), data.test_x, data)
    assert all(-1 <= v <= 1 for v in d["hue_cosine"].values())
    assert d["hue_cosine_z"]["0.5"] < 1 - 1e-4 and 0 <= d["colour_probe_top1"] <= 100


class ColourReader(torch.nn.Module):
    """A stand-in encoder whose h is one colour statistic of the un-normalised image."""

    def __init__(self, read, data):
        super().__init__()
        self.read, self.mean, self.std = read, torch.tensor(data.mean), torch.tensor(data.std)

    def forward(self, x):
        h = self.read(x * self.std.view(1, 3, 1, 1) + self.mean.view(1, 3, 1, 1))
        return h, torch.nn.functional.normalize(h, dim=1)


def reddish_images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([200.0, 70.0, 40.0]).view(1, 3, 1, 1)
    return (base + 30 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 255).to(torch.uint8)


def test_colour_probe_is_at_chance_on_hsv_value_and_far_above_on_mean_colour():
    x = reddish_images()
    data = care.Data(x, torch.zeros(64, dtype=torch.long), x, torch.zeros(64, dtype=torch.long),
                     ["c"], (0.5, 0.3, 0.2), (0.2, 0.2, 0.2))
    value = care.colour_diagnostics(ColourReader(lambda v: v.amax(1).flatten(1), data), x, data)
    mean = care.colour_diagnostics(ColourReader(lambda v: v.mean((2, 3)), data), x, data)
    chance = 100 / care.HUE_TURNS
    assert value["colour_probe_top1"] == pytest.approx(chance, abs=0.5)     # a turn keeps V
    assert value["hue_cosine"]["0.5"] == pytest.approx(1, abs=1e-5)
    assert mean["colour_probe_top1"] > 5 * chance


def test_colour_probe_is_repeatable_for_a_seed():
    g = torch.Generator().manual_seed(0)
    by_turn = [torch.randn(40, 16, generator=g) + 0.3 * k for k in range(care.HUE_TURNS)]
    assert care.colour_probe(by_turn, seed=3) == care.colour_probe(by_turn, seed=3)
    before = torch.random.get_rng_state()
    care.colour_probe(by_turn, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)   # the global stream untouched


@pytest.mark.parametrize("family", ["flip", "grayscale"])
def test_family_pairs_differ_in_that_family_only(family):
    x, g = images(4), torch.Generator().manual_seed(0)
    a, a2 = care.family_pair(family, g)
    v, v2 = (care.augment(x, 4, u=u, mean=(0.0,) * 3, std=(1.0,) * 3) for u in (a, a2))
    expected = v.flip(3) if family == "flip" else care.rgb_to_grayscale(v).expand_as(v)
    assert torch.allclose(v2, expected, atol=1e-5) and not torch.allclose(v, v2, atol=1e-3)


def test_monitoring_every_epoch_leaves_training_unchanged(tiny_folder, tmp_path):
    every = care.main(tiny_args(tiny_folder, tmp_path / "a", "--epochs", "2"))
    rarely = care.main(tiny_args(tiny_folder, tmp_path / "b", "--epochs", "2", "--knn-every", "2"))
    assert [r.get("colour_probe_top1") is None for r in rarely["epochs"]] == [False, True, False]
    for r, q in zip(every["epochs"][1:], rarely["epochs"][1:]):     # epoch 2 follows a monitor
        assert [r[k] for k in care.TERMS] == [q[k] for k in care.TERMS]     # in one run only
    assert every["epochs"][2]["gram_error"] == rarely["epochs"][2]["gram_error"]


def test_gram_error_zero_for_rotation_and_hue_shift_zero_is_identity():
    Z = unit(64, 8)
    assert care.gram_error(Z, Z @ random_orthogonal(8).T) < 1e-10
    assert care.gram_error(Z, unit(64, 8, 1)) > 1e-3
    x = images(4)
    assert torch.allclose(care.adjust_hue(x, 0.0), x, atol=1e-6)
    assert torch.allclose(care.adjust_hue(x, 1.0), x, atol=1e-5)     # a full turn


# ----------------------------------------------------------------------------- speed
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
    fast, plain = ("torch.bfloat16", "torch.channels_last"), ("torch.float32", "torch.contiguous_format")
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
    import ast
    lines = open(care.__file__).read().splitlines()
    banner = next(i for i, l in enumerate(lines, 1) if l.startswith("# Part II, the machinery"))
    first = banner - 1                                  # the rule above the banner
    assert f"It ends at line {first}," in care.__doc__ and first <= 450
    part_one = "\n".join(lines[:first])
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
    (["--group-size", "0"], "--group-size must be at least 1"),
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
    (["--knn-every", "0"], "--knn-every must be at least 1"),
    (["--benchmark", "--method", "simclr", "--batch-size", "100"], "not a multiple"),
    (["--no-such-flag"], "unrecognized arguments"),
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
    assert code == 2 and "no images" in line


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


def test_resume_rejects_corrupt_and_incompatible_checkpoints(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, line = run_error(["--resume", str(bad)], capsys)
    assert code == 2 and "cannot read" in line
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1"))
    code, line = run_error(["--resume", str(tmp_path / "run" / "checkpoint.pt"),
                            "--arch", "resnet34"], capsys)
    assert code == 2 and "--arch resnet18" in line
    code, line = run_error(["--resume", str(tmp_path / "run" / "checkpoint.pt"),
                            "--optimizer", "sgd"], capsys)
    assert code == 2 and "--optimizer adam" in line
    code, line = run_error(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1"), capsys)
    assert code == 2 and "already holds a run" in line          # never overwritten silently


def test_resume_takes_checkpoint_settings_but_flags_typed_again_win(tiny_folder, tmp_path):
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1", "--lam", "0.1"))
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    cfg, _ = configure((["--resume", ckpt, "--epochs", "200"]))
    assert cfg.epochs == 200 and cfg.lam == 0.1 and cfg.image_size == 8   # 200 is the default
    assert cfg.out == str(tmp_path / "run")
    cfg, _ = configure((["--resume", ckpt, "--lam", "0.1", "--knn-every", "3"]))  # the same again
    assert cfg.lam == 0.1 and cfg.epochs == 1 and cfg.knn_every == 3
    with pytest.raises(care.CareError, match="trained with --lam 0.1, not 0.03"):
        configure(["--resume", ckpt, "--lam", "0.03"])
    saved = torch.load(ckpt, weights_only=True)                 # a cosine schedule's length
    saved["config"]["lr_schedule"] = "cosine"                   # is fixed: no jump in the lr
    torch.save(saved, tmp_path / "cosine.pt")
    with pytest.raises(care.CareError, match="cosine schedule ends at epoch 1"):
        configure((["--resume", str(tmp_path / "cosine.pt"),
                                                 "--epochs", "3"]))


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


def test_interrupt_then_resume_continues_exactly(tiny_folder, tmp_path, monkeypatch, capsys):
    straight = care.main(tiny_args(tiny_folder, tmp_path / "a", "--epochs", "2"))
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
    resumed = care.main(["--resume", str(tmp_path / "b" / "checkpoint.pt")])
    a, b = straight["epochs"], resumed["epochs"]
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], rel=1e-5)
    assert b[2]["knn_top1"] == a[2]["knn_top1"] and resumed["linear_top1"] == straight["linear_top1"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(
        tiny_folder, tmp_path, monkeypatch, capsys):
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1"))
    monkeypatch.setattr(care, "info_nce", lambda *a: torch.tensor(float("nan")))
    monkeypatch.setattr(care, "LOG_EVERY", 1)
    code, line = run_error(["--resume", str(tmp_path / "run" / "checkpoint.pt"),
                            "--epochs", "2"], capsys)
    assert code == 1 and "non-finite loss" in line and "epoch 2 step 1/4" in line
    assert torch.load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def test_sigterm_keeps_last_epoch_and_exits_without_traceback(tiny_folder, tmp_path):
    import subprocess, sys, time, signal, os
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "care.py", *tiny_args(tiny_folder, out, "--epochs", "500")],
                            cwd=os.path.dirname(os.path.abspath(care.__file__)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_every_epoch_draws_fresh_streams_so_a_resume_never_replays_epoch_one(
        tiny_folder, tmp_path, monkeypatch):
    # The random streams are keyed by (seed, epoch[, rank]): nothing to carry over, so a
    # checkpoint resumed on another device (whose generator it could not restore) still
    # draws a new order for the next epoch.
    order = lambda epoch: torch.randperm(72, generator=care.random_stream("cpu", 0, epoch))
    assert not torch.equal(order(1), order(2)) and torch.equal(order(2), order(2))
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1"))
    keys, real = [], care.random_stream
    monkeypatch.setattr(care, "random_stream", lambda dev, *key: keys.append(key) or real(dev, *key))
    care.main(["--resume", str(tmp_path / "run" / "checkpoint.pt"), "--epochs", "2"])
    assert keys[:2] == [(0, 2), (0, 2, 0)]                     # order, then augmentations


def test_restore_gives_adam_moments_the_parameters_memory_layout(tiny_folder, tmp_path):
    cfg = cfg_for(group_size=4)
    model, _ = care.build_model(cfg, torch.device("cpu"), care.Machine())   # contiguous
    opt, sched = care.make_optimizer(model, cfg, 4)
    care.train_step(model, opt, (images(8, H=8) * 255).to(torch.uint8), cfg)
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1,
            "scheduler": sched.state_dict(), "metrics": {"wall_time_s": 1.0, "epochs": []}}
    machine = care.Machine(torch.float32, True)
    model, _ = care.build_model(cfg, torch.device("cpu"), machine)         # channels_last
    opt, sched = care.make_optimizer(model, cfg, 4)
    care.restore(ckpt, care.RunState(model, model, opt, sched, machine, None, None, {}, print))
    w = model.backbone.layer1[0].conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[w]["exp_avg"].stride() == opt.state[w]["exp_avg_sq"].stride() == w.stride()


def test_restore_keeps_this_machines_fused_optimizer(tiny_folder, tmp_path):
    """A CPU checkpoint (unfused Adam) resumed where Adam is fused (CUDA; here a fused CPU
    Adam stands in) stays fused, so fp16's loss scaler can hand it grad_scale."""
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert not ckpt["optimizer"]["param_groups"][0]["fused"]
    cfg = cfg_for(group_size=4)
    model, _ = care.build_model(cfg, torch.device("cpu"), care.Machine())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    care.restore(ckpt, care.RunState(model, model, opt, sched, care.Machine(), None, None, {}, print))
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
    assert code == 1 and "out of GPU memory" in line


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
    monkeypatch.setenv("WORLD_SIZE", "2")           # as torchrun --nproc_per_node=2 sets it
    for argv, words in ((["--batch-size", "3", "--group-size", "1"], "not divisible by the 2"),
                        (["--batch-size", "2", "--group-size", "1"], "leaves 1 image per process"),
                        (["--sync-bn"], "--sync-bn needs CUDA")):
        code, line = run_error(argv + ["--device", "cpu", "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and words in line


def test_resume_takes_the_machine_settings_from_this_machine(tiny_folder, tmp_path):
    care.main(tiny_args(tiny_folder, tmp_path / "run", "--epochs", "1"))
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(sync_bn=True, compile=True, device="cuda")  # as saved on a GPU node
    torch.save(ckpt, path)
    cfg, _ = configure((["--resume", str(path), "--epochs", "2"]))
    assert (cfg.sync_bn, cfg.compile, cfg.device) == (False, False, "auto")
    assert cfg.epochs == 2 and cfg.group_size == 4                 # the run's own settings stay


def torchrun(*args, timeout=180):
    """`torchrun --standalone --nproc_per_node=2 care.py ARGS`; on a timeout the launcher and
    its workers are killed together and the test fails (a hang must not outlive it)."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "care.py", *args], start_new_session=True,
                         cwd=os.path.dirname(os.path.abspath(care.__file__)), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_two_process_run_and_resume_under_torchrun(tiny_folder, tmp_path):
    p = torchrun(*tiny_args(tiny_folder, tmp_path / "ddp", "--epochs", "1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("linear probe top-1") == 1               # process 0 speaks, once
    p = torchrun("--resume", str(tmp_path / "ddp" / "checkpoint.pt"), "--epochs", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    m = read_json(tmp_path / "ddp" / "metrics.json")
    assert m["world_size"] == 2 and [r["epoch"] for r in m["epochs"]] == [0, 1, 2]
    assert all(r["knn_top1"] is not None for r in m["epochs"])


@pytest.mark.parametrize("argv,words", [
    (["--batch-size", "17", "--group-size", "1"], "not divisible by the 2 processes"),
    (["--batch-size", "16", "--group-size", "16"], "on each of 2 processes (8 images each)"),
    (["--device", "cuda"], "GPU"),
])
def test_bad_input_under_torchrun_exits_on_every_process_with_one_line(argv, words, tiny_folder,
                                                                       tmp_path):
    if "cuda" in argv and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU for each process")
    p = torchrun(*tiny_args(tiny_folder, tmp_path / "bad"), *argv, timeout=120)
    errors = [l for l in (p.stdout + p.stderr).splitlines() if "care.py: error:" in l]
    assert p.returncode != 0 and len(errors) == 1 and words in errors[0], errors
    assert not (tmp_path / "bad").exists()


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


def test_sigterm_to_torchrun_stops_every_process_and_keeps_the_last_epoch(tiny_folder, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "care.py", *tiny_args(tiny_folder, out, "--epochs", "500")],
                         cwd=os.path.dirname(os.path.abspath(care.__file__)), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)                   # to the launcher, as Ctrl-C would go
        stdout, _ = p.communicate(timeout=60)           # every process ends within seconds
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "--resume" in stdout and not processes_mentioning(out)
    kept = torch.load(out / "checkpoint.pt")["epoch"]
    assert kept >= 1 and [r["epoch"] for r in read_json(out / "metrics.json")["epochs"]] == list(
        range(kept + 1))
