"""Tests of the IMAGE adaptive masking (docs/image.md), against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from grounding.models.adaptive_masking import (
    AdaptiveMasking,
    MaskingConfig,
    apply_mask,
    importance_prior,
    pooled_size,
    radiance_field_mask,
    random_mask,
    schedule,
    threshold_mask,
    top_ratio_points,
)


def dense_prior(x, valid=None, tau=None):
    """Direct prior with an explicit N×N softmax per image: x (B, D, H, W) -> (B, H, W)."""
    b, d, h, w = x.shape
    tau = 1 / math.sqrt(d) if tau is None else tau
    out = torch.zeros(b, h, w, dtype=x.dtype)
    for i in range(b):
        tokens = x[i].permute(1, 2, 0).reshape(h * w, d)  # (N, D) row-major
        keep = torch.ones(h * w, dtype=torch.bool) if valid is None else valid[i].reshape(-1)
        t = tokens[keep]
        t = t / t.norm(dim=1, keepdim=True)
        a = torch.softmax(torch.einsum("nd,md->nm", t, t) / tau, dim=1)  # (N_b, N_b)
        received = a.sum(dim=0) / t.shape[0]
        received = (received - received.min()) / (received.max() - received.min())
        flat = torch.zeros(h * w, dtype=x.dtype)
        flat[keep] = received
        out[i] = flat.view(h, w)
    return out


def padded_valid(b, h, w, sizes):
    """valid (B, H, W) with image i valid on its top-left sizes[i] = (h_i, w_i) region."""
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        valid[i, :hi, :wi] = True
    return valid


# ----------------------------------------------------------------------------- importance prior


@pytest.mark.parametrize("chunk_size", [1024, 7, 1])
def test_prior_equals_dense_softmax(chunk_size):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 6, 9, dtype=torch.float64)
    got = importance_prior(x, chunk_size=chunk_size)
    torch.testing.assert_close(got, dense_prior(x), rtol=0, atol=1e-12)
    assert torch.allclose(got.amin(dim=(1, 2)), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(got.amax(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


def test_prior_custom_tau_equals_dense():
    torch.manual_seed(1)
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(importance_prior(x, tau=0.05, chunk_size=4), dense_prior(x, tau=0.05))


@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_prior_with_padding_excludes_padding_tokens(chunk_size):
    torch.manual_seed(2)
    x = torch.randn(2, 10, 6, 8, dtype=torch.float64)
    valid = padded_valid(2, 6, 8, [(6, 5), (4, 8)])
    got = importance_prior(x, valid, chunk_size=chunk_size)
    torch.testing.assert_close(got, dense_prior(x, valid), rtol=0, atol=1e-12)
    assert (got[~valid] == 0).all()
    # padding features cannot change anything
    x2 = x.clone()
    x2[~valid[:, None].expand_as(x)] = 1e3
    torch.testing.assert_close(importance_prior(x2, valid, chunk_size=chunk_size), got)
    for i in range(2):
        assert got[i][valid[i]].min() == 0 and got[i][valid[i]].max() == 1


def test_prior_pooled_path_is_dense_on_pooled_grid_then_bilinear():
    torch.manual_seed(3)
    x = torch.randn(2, 8, 20, 33, dtype=torch.float64)
    got = importance_prior(x, max_tokens=64, chunk_size=16)
    ph, pw = pooled_size(20, 33, 64)
    assert ph * pw <= 64 and (ph, pw) == (6, 10)  # floor(20·s), floor(33·s), s = sqrt(64/660)
    coarse = dense_prior(F.adaptive_avg_pool2d(x, (ph, pw)))
    up = F.interpolate(coarse[:, None], size=(20, 33), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(got, (up - lo) / (hi - lo), rtol=0, atol=1e-12)


def test_prior_pooled_path_with_padding():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 20, 30, dtype=torch.float64)
    valid = padded_valid(2, 20, 30, [(20, 30), (13, 21)])
    got = importance_prior(x, valid, max_tokens=60)
    assert (got[~valid] == 0).all()
    for i in range(2):
        assert got[i][valid[i]].min() == 0 and got[i][valid[i]].max() == 1
    x2 = x.clone()
    x2[~valid[:, None].expand_as(x)] = -50.0
    torch.testing.assert_close(importance_prior(x2, valid, max_tokens=60), got)
    # image 0 has no padding: same as the unpadded computation
    torch.testing.assert_close(got[:1], importance_prior(x[:1], max_tokens=60))


def test_prior_has_no_gradient():
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    imp = importance_prior(x)
    assert not imp.requires_grad and imp.grad_fn is None
    assert imp.dtype == torch.float32


def test_prior_never_allocates_n_by_n():
    """Peak RSS of the full-grid (chunked) prior at a 100×167 level stays far below N²·4 bytes."""
    status = "/proc/self/status"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS on this system")

    def kib(field):
        with open(status) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    torch.manual_seed(5)
    x = torch.randn(1, 8, 100, 167)
    n = 100 * 167
    before = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    imp = importance_prior(x, max_tokens=n, chunk_size=256)
    peak_extra = (kib("VmHWM:") - before) * 1024
    assert imp.shape == (1, 100, 167)
    assert peak_extra < n * n * 4 / 8, f"peak {peak_extra / 1e6:.0f} MB vs N×N {n * n * 4 / 1e6:.0f} MB"


# ----------------------------------------------------------------------------- selections and masks


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_top_ratio_points_count_and_order(ratio):
    torch.manual_seed(6)
    imp = torch.rand(3, 7, 6)
    valid = padded_valid(3, 7, 6, [(7, 6), (5, 6), (3, 3)])
    for v in (None, valid):
        pts = top_ratio_points(imp, ratio, v)
        assert pts.dtype == torch.bool
        for i in range(3):
            ok = torch.ones(7, 6, dtype=torch.bool) if v is None else v[i]
            n = int(ok.sum())
            count = math.floor(ratio * n + 0.5)
            assert int(pts[i].sum()) == count
            assert not (pts[i] & ~ok).any()
            if 0 < count < n:  # every selected one beats every unselected valid one
                assert imp[i][pts[i]].min() > imp[i][ok & ~pts[i]].max()


def test_top_ratio_points_ties_are_deterministic():
    imp = torch.zeros(1, 4, 4)
    pts = top_ratio_points(imp, 0.25, None)
    assert pts.view(-1)[:4].all() and int(pts.sum()) == 4  # first positions in row-major order


def test_threshold_mask_is_binary_top_r():
    torch.manual_seed(7)
    imp = torch.rand(2, 5, 8, dtype=torch.float64)
    m = threshold_mask(imp, 0.3)
    assert m.dtype == torch.float64
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m.bool(), top_ratio_points(imp, 0.3))
    assert (m.sum(dim=(1, 2)) == 12).all()


def direct_field(imp, points, sigma):
    """R(x, y) = Σ_p I_p exp(−‖(x,y) − p‖²/(2σ²)) over |dx|, |dy| <= ceil(3σ), with loops."""
    h, w = imp.shape
    radius = math.ceil(3 * sigma)
    field = torch.zeros(h, w, dtype=torch.float64)
    for py in range(h):
        for px in range(w):
            if not points[py, px]:
                continue
            for y in range(h):
                for x in range(w):
                    if abs(y - py) <= radius and abs(x - px) <= radius:
                        d2 = (y - py) ** 2 + (x - px) ** 2
                        field[y, x] += imp[py, px] * math.exp(-d2 / (2 * sigma**2))
    return field


@pytest.mark.parametrize("sigma", [1.0, 0.7, 2.3])
def test_radiance_field_mask_equals_direct_gaussian_sum(sigma):
    torch.manual_seed(8)
    imp = torch.rand(2, 9, 11, dtype=torch.float64)
    m = radiance_field_mask(imp, 0.2, sigma)
    pts = top_ratio_points(imp, 0.2)
    for i in range(2):
        field = direct_field(imp[i], pts[i], sigma)
        torch.testing.assert_close(m[i], field / field.max(), rtol=0, atol=1e-12)
    assert torch.allclose(m.amax(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    assert (m >= 0).all() and (m <= 1).all()


def test_radiance_field_mask_with_padding_and_zero_ratio():
    torch.manual_seed(9)
    imp = torch.rand(2, 8, 8, dtype=torch.float64)
    valid = padded_valid(2, 8, 8, [(8, 8), (5, 4)])
    m = radiance_field_mask(imp, 0.3, 1.0, valid)
    assert (m[~valid] == 0).all()
    assert torch.allclose(m.amax(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    masked_imp = imp * valid
    for i in range(2):
        field = direct_field(masked_imp[i], top_ratio_points(imp, 0.3, valid)[i], 1.0) * valid[i]
        torch.testing.assert_close(m[i], field / field.max(), rtol=0, atol=1e-12)
    assert (radiance_field_mask(imp, 0.0, 1.0, valid) == 0).all()


def test_random_mask_count_validity_and_seed():
    valid = padded_valid(2, 10, 12, [(10, 12), (6, 7)])
    g = torch.Generator().manual_seed(123)
    m1 = random_mask((2, 10, 12), 0.35, valid, generator=g)
    m2 = random_mask((2, 10, 12), 0.35, valid, generator=torch.Generator().manual_seed(123))
    m3 = random_mask((2, 10, 12), 0.35, valid, generator=torch.Generator().manual_seed(7))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert m1.sum(dim=(1, 2)).tolist() == [math.floor(0.35 * 120 + 0.5), math.floor(0.35 * 42 + 0.5)]
    assert (m1[~valid] == 0).all()
    like = torch.zeros(2, 10, 12, dtype=torch.float64)
    assert random_mask(like, 0.5).dtype == torch.float64


def test_random_mask_is_uniform():
    g = torch.Generator().manual_seed(0)
    hits = sum(random_mask((1, 4, 5), 0.25, generator=g) for _ in range(2000))[0]
    # each position is chosen with probability 5/20; binomial std of the count ≈ 19.4
    assert (hits - 500).abs().max() < 5 * 19.4


# ----------------------------------------------------------------------------- schedule, application


def test_schedule_formulas_and_clamp():
    cfg = MaskingConfig(r0=[0.1, 0.2, 0.3, 0.4], r1=[0.5, 0.4, 0.3, 0.9], k0=0.5)
    for p, want_k in [(0.0, 0.5), (0.5, 0.25), (1.0, 0.0), (-1.0, 0.5), (3.0, 0.0)]:
        ratios, k = schedule(p, cfg, 4)
        q = min(max(p, 0.0), 1.0)
        want = [a + (z - a) * q for a, z in zip([0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.3, 0.9])]
        assert ratios == pytest.approx(want) and k == pytest.approx(want_k)
    assert schedule(0.5, cfg, 2)[0] == pytest.approx([0.3, 0.3])


def test_ratio_lists_must_match_the_model_and_grow():
    with pytest.raises(ValueError, match=r"MaskingConfig.r1 must be >= r0 at every level .* level 1 has r1 0.1 < r0 0.2"):
        MaskingConfig(r0=[0.1, 0.2], r1=[0.3, 0.1])
    for ratios in ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]):
        with pytest.raises(ValueError, match=rf"MaskingConfig.r0 has {len(ratios)} ratios but the model has 4 feature levels"):
            MaskingConfig(r0=ratios).check_levels(4)
    MaskingConfig().check_levels(4)


def test_schedule_default_r1_and_fixed():
    cfg = MaskingConfig()
    assert schedule(1.0, cfg, 4)[0] == pytest.approx([0.3, 0.4, 0.5, 0.6])
    assert cfg.final_ratios == pytest.approx((0.3, 0.4, 0.5, 0.6))
    fixed = MaskingConfig(progressive=False, k0=0.4)
    assert schedule(0.7, fixed, 4) == (list(fixed.r0), 0.4)
    with pytest.raises(ValueError, match="r0"):
        schedule(0.5, cfg, 5)


def test_apply_mask():
    torch.manual_seed(10)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    mask = (torch.rand(2, 4, 5) > 0.5).float()
    assert torch.equal(apply_mask(x, mask, 1.0), x)
    out = apply_mask(x, mask, 0.0)
    assert (out[mask[:, None].expand_as(x).bool()] == 0).all()
    keep = ~mask[:, None].expand_as(x).bool()
    assert torch.equal(out[keep], x[keep])
    soft = torch.rand(2, 4, 5)
    torch.testing.assert_close(apply_mask(x, soft, 0.3), x * (1 - 0.7 * soft)[:, None])
    out.sum().backward()
    torch.testing.assert_close(x.grad, (1 - mask)[:, None].expand_as(x))


# ----------------------------------------------------------------------------- module and config


def pyramid(b=2, d=8, sizes=((16, 20), (8, 10), (4, 5), (2, 3)), requires_grad=False):
    return [torch.randn(b, d, h, w, requires_grad=requires_grad) for h, w in sizes]


def test_module_eval_and_none_are_identity():
    torch.manual_seed(11)
    feats = pyramid()
    module = AdaptiveMasking(MaskingConfig()).eval()
    out, masks = module(feats, 0.5)
    assert all(o is f for o, f in zip(out, feats)) and masks == [None] * 4
    assert module.mask_level(feats[0], 0, 0.5) == (feats[0], None)
    assert module.last_masks == {}
    none = AdaptiveMasking(MaskingConfig(variant="none")).train()
    out, masks = none(feats, 0.5)
    assert all(o is f for o, f in zip(out, feats)) and masks == [None] * 4


@pytest.mark.parametrize("variant", ["threshold", "random"])
def test_module_train_masked_fraction(variant):
    torch.manual_seed(12)
    feats = pyramid()
    module = AdaptiveMasking(MaskingConfig(variant=variant)).train()
    out, masks = module(feats, 1.0)  # r = r1 = r0 + 0.2, k = 0
    for level, (f, o, m) in enumerate(zip(feats, out, masks)):
        n = f.shape[2] * f.shape[3]
        ratio = (0.3, 0.4, 0.5, 0.6)[level]
        assert (m.sum(dim=(1, 2)) == math.floor(ratio * n + 0.5)).all()
        assert (o[m[:, None].expand_as(o).bool()] == 0).all()  # k(1) = 0: masked patches erased
        assert module.last_ratios[level] == pytest.approx(ratio)
        assert torch.equal(module.last_masks[level], m)
    assert module.last_strength == 0.0


def test_module_rf_gam_with_padding_gradient_and_no_state():
    torch.manual_seed(13)
    feats = pyramid(requires_grad=True)
    sizes = [(f.shape[2], f.shape[3]) for f in feats]
    valid = [padded_valid(2, h, w, [(h, w), (h // 2 + 1, w)]) for h, w in sizes]
    module = AdaptiveMasking(MaskingConfig(max_tokens=64)).train()
    out, masks = module(feats, 0.0, valid)
    assert len(module.state_dict()) == 0 and len(list(module.parameters())) == 0
    for f, o, m, v in zip(feats, out, masks, valid):
        assert m.shape == v.shape and (m[~v] == 0).all()
        assert torch.allclose(m.amax(dim=(1, 2)), torch.ones(2))
        torch.testing.assert_close(o, f * (1 - 0.5 * m)[:, None])  # k(0) = k0 = 0.5
        assert not m.requires_grad
    sum(o.sum() for o in out).backward()
    torch.testing.assert_close(feats[0].grad, (1 - 0.5 * masks[0])[:, None].expand_as(feats[0]))
    assert module.last_strength == 0.5 and module.last_ratios[3] == pytest.approx(0.4)


def test_module_rejects_too_many_levels():
    module = AdaptiveMasking(MaskingConfig(r0=[0.1, 0.2])).train()
    with pytest.raises(ValueError, match="r0"):
        module(pyramid(), 0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"variant": "gaussian"}, "variant"),
        ({"r0": [0.1, 1.5]}, "r0"),
        ({"r0": []}, "r0"),
        ({"r1": [0.2, 0.3]}, "r1"),
        ({"r1": [0.2, 0.3, 0.4, -0.1]}, "r1"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"k0": 1.5}, "k0"),
        ({"tau": 0.0}, "tau"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"MaskingConfig.{field}"):
        MaskingConfig(**kwargs)


def test_config_accepts_lists():
    cfg = MaskingConfig(r0=[0.1, 0.2], r1=[0.3, 0.4])
    assert cfg.r0 == (0.1, 0.2) and cfg.r1 == (0.3, 0.4)
