"""Sparse 3D encoders (splatsem_ns.encoders).

The sparse convolutions are checked against dense ``torch.nn.functional`` convolutions on densified grids
(values and both gradients), and against spconv's CPU build on one thread where spconv is installed. Then
voxelisation against a numpy reference, serialisation curves, patch attention with padding, the two backbones,
the registry and the Gaussian encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import gpu_only

from splatsem_ns.encoders import (
    BACKBONES,
    GAUSSIAN_CHANNELS,
    GaussianEncoder,
    GaussianEncoderConfig,
    InverseConv3d,
    Registry,
    SparseTensor,
    SpUNetConfig,
    StridedConv3d,
    SubmanifoldConv3d,
    available_backbones,
    build_backbone,
    estimate_normals,
    gaussian_input_features,
    hilbert_decode,
    hilbert_encode,
    inverse_conv3d,
    patch_attention,
    patch_layout,
    serialize,
    strided_conv3d,
    submanifold_conv3d,
    voxelize,
    z_order_decode,
    z_order_encode,
)
from splatsem_ns.encoders.layers import SceneDropPath
from splatsem_ns.encoders.serialization import MAX_DEPTH
from splatsem_ns.encoders.sparse_conv import submanifold_kernel_map

GRID = 12
"""Edge of the dense grid the sparse convs are compared on (about 15% of its voxels active)."""


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test (spconv's CPU build needs it; bitwise determinism is checked on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sites(batch_size=2, channels=3, density=0.15, seed=0, dtype=torch.float64) -> SparseTensor:
    """Random active voxels of a GRID^3 grid per scene, rows shuffled (the convs must not rely on order)."""
    generator = torch.Generator().manual_seed(seed)
    coords = (torch.rand(batch_size, GRID, GRID, GRID, generator=generator) < density).nonzero().int()
    coords = coords[torch.randperm(coords.shape[0], generator=generator)]
    features = torch.randn(coords.shape[0], channels, generator=generator, dtype=dtype)
    return SparseTensor(coords, features, batch_size)


def densify(features, coords, batch_size, shape):
    """Differentiable ``[B, C, X, Y, Z]`` grid with ``features`` at ``coords`` and zeros elsewhere."""
    c = coords.long()
    dense = features.new_zeros(batch_size, *shape, features.shape[1])
    dense = dense.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), features)
    return dense.permute(0, 4, 1, 2, 3)


def read_sites(dense, coords):
    c = coords.long()
    return dense.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


def grads_of(output, *inputs):
    """Backpropagate a fixed random cotangent; returns the gradients of ``inputs``."""
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    (output * cotangent).sum().backward()
    return [t.grad for t in inputs]


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# --- sparse convolution against dense convolution ------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_submanifold_conv_matches_dense_conv3d(kernel_size):
    x = random_sites(channels=3)
    weight = leaf(torch.randn(4, kernel_size, kernel_size, kernel_size, 3, dtype=torch.float64))
    features = leaf(x.features)
    out = submanifold_conv3d(x.replace_features(features), weight)
    assert torch.equal(out.coords, x.coords)
    grad_features, grad_weight = grads_of(out.features, features, weight)

    ref_features, ref_weight = leaf(x.features), leaf(weight.permute(0, 4, 1, 2, 3))
    dense = densify(ref_features, x.coords, 2, (GRID,) * 3)
    ref = read_sites(F.conv3d(dense, ref_weight, padding=kernel_size // 2), x.coords)
    ref_grad_features, ref_grad_weight = grads_of(ref, ref_features, ref_weight)

    torch.testing.assert_close(out.features, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_features, ref_grad_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight.permute(0, 4, 1, 2, 3), ref_grad_weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_submanifold_conv_module_float32_with_bias(kernel_size):
    x = random_sites(channels=5, dtype=torch.float32, seed=3)
    conv = SubmanifoldConv3d(5, 7, kernel_size, bias=True, backend="torch")
    out = conv(x)
    dense_weight = conv.weight.permute(0, 4, 1, 2, 3)
    dense = F.conv3d(x.dense((GRID,) * 3), dense_weight, conv.bias, padding=kernel_size // 2)
    torch.testing.assert_close(out.features, read_sites(dense, x.coords), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size,stride", [(2, 2), (3, 2)])
def test_strided_conv_matches_dense_conv3d(kernel_size, stride):
    x = random_sites(channels=3, seed=1)
    weight = leaf(torch.randn(4, kernel_size, kernel_size, kernel_size, 3, dtype=torch.float64))
    features = leaf(x.features)
    out = strided_conv3d(x.replace_features(features), weight, stride=stride)
    grad_features, grad_weight = grads_of(out.features, features, weight)

    ref_features, ref_weight = leaf(x.features), leaf(weight.permute(0, 4, 1, 2, 3))
    dense = densify(ref_features, x.coords, 2, (GRID,) * 3)
    pad = kernel_size - 1  # room for the coarse sites whose window runs past the grid's far border
    dense_out = F.conv3d(F.pad(dense, (0, pad) * 3), ref_weight, stride=stride)
    ref = read_sites(dense_out, out.coords)
    ref_grad_features, ref_grad_weight = grads_of(ref, ref_features, ref_weight)

    # The coarse sites are exactly the cells whose window holds an active voxel.
    mask = F.pad(x.active_mask((GRID,) * 3)[:, None].double(), (0, pad) * 3)
    window = torch.ones(1, 1, kernel_size, kernel_size, kernel_size, dtype=torch.float64)
    expected_sites = F.conv3d(mask, window, stride=stride)[:, 0] > 0
    assert torch.equal(out.active_mask(tuple(expected_sites.shape[1:])), expected_sites)
    torch.testing.assert_close(out.features, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_features, ref_grad_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight.permute(0, 4, 1, 2, 3), ref_grad_weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("made_by_strided_conv", [True, False])
@pytest.mark.parametrize("kernel_size", [2, 3])
def test_inverse_conv_matches_dense_conv_transpose3d(made_by_strided_conv, kernel_size):
    fine = random_sites(channels=3, seed=2)
    coarse = strided_conv3d(
        fine, torch.randn(4, kernel_size, kernel_size, kernel_size, 3, dtype=torch.float64)
    )
    if not made_by_strided_conv:
        # A coarse grid with no link to the fine one (and some sites missing): the map is built by lookup.
        keep = torch.rand(coarse.num_sites, generator=torch.Generator().manual_seed(4)) < 0.7
        coarse = SparseTensor(coarse.coords[keep], coarse.features[keep], coarse.batch_size)
    weight = leaf(torch.randn(3, kernel_size, kernel_size, kernel_size, 4, dtype=torch.float64))
    features = leaf(coarse.features)
    out = inverse_conv3d(coarse.replace_features(features), fine, weight)
    assert torch.equal(out.coords, fine.coords)
    grad_features, grad_weight = grads_of(out.features, features, weight)

    ref_features = leaf(coarse.features)
    ref_weight = leaf(weight.permute(4, 0, 1, 2, 3))  # conv_transpose3d: [C_in, C_out, k, k, k]
    coarse_shape = tuple(int(v) + 1 for v in coarse.coords[:, 1:].amax(0))
    dense = densify(ref_features, coarse.coords, 2, coarse_shape)
    ref = read_sites(F.conv_transpose3d(dense, ref_weight, stride=2), fine.coords)
    ref_grad_features, ref_grad_weight = grads_of(ref, ref_features, ref_weight)

    torch.testing.assert_close(out.features, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_features, ref_grad_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight.permute(4, 0, 1, 2, 3), ref_grad_weight, rtol=1e-5, atol=1e-5)


def test_scenes_in_one_batch_do_not_leak():
    both = random_sites(batch_size=2, channels=3, seed=5)
    convs = (
        SubmanifoldConv3d(3, 4, 3, backend="torch").double(),
        StridedConv3d(4, 5, backend="torch").double(),
        InverseConv3d(5, 2, backend="torch").double(),
    )

    def run(x):
        fine = convs[0](x)
        return convs[2](convs[1](fine), fine).features

    together = run(both)
    for scene in (0, 1):
        rows = both.coords[:, 0] == scene
        coords = both.coords[rows].clone()
        coords[:, 0] = 0
        alone = run(SparseTensor(coords, both.features[rows], 1))
        torch.testing.assert_close(together[rows], alone, rtol=1e-10, atol=1e-10)


def test_kernel_maps_are_cached_and_shared():
    x = random_sites(seed=6)
    first = submanifold_kernel_map(x, 3)
    assert submanifold_kernel_map(x.replace_features(x.features * 2), 3) is first
    # Mirror offsets carry mirrored pairs; the centre is the identity.
    assert first.identity_offset == 13 and first.bounds[14] - first.bounds[13] == 0
    for k in range(13):
        a_in, a_out = first.pairs(k)
        b_in, b_out = first.pairs(26 - k)
        assert torch.equal(a_in, b_out) and torch.equal(a_out, b_in)
    coarse = strided_conv3d(x, torch.randn(2, 2, 2, 2, 3, dtype=torch.float64))
    again = strided_conv3d(x, torch.randn(2, 2, 2, 2, 3, dtype=torch.float64))
    assert again.cache is coarse.cache  # the next level's convs share their maps too


def test_sparse_conv_is_deterministic_on_cpu(one_thread):
    x = random_sites(channels=8, seed=7, dtype=torch.float32)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        backbone = build_backbone("SpUNet-v1", 8, preset="tiny", conv_backend="torch")
        fresh = SparseTensor(x.coords, leaf(x.features), x.batch_size)
        backbone(fresh).features.square().sum().backward()
        results.append([fresh.features.grad] + [p.grad for p in backbone.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


# --- spconv's CPU build as a second oracle (optional) ---------------------------------------------------------


def test_matches_spconv_cpu_on_one_thread(one_thread):
    spconv = pytest.importorskip(
        "spconv.pytorch",
        reason="spconv is not installed (optional accelerator; the torch backend is the default)",
    )
    x = random_sites(channels=4, seed=8, dtype=torch.float32)
    shape = [GRID] * 3
    torch.manual_seed(0)

    subm = spconv.SubMConv3d(4, 6, 3, bias=False, indice_key="subm")
    sparse = spconv.SparseConvTensor(x.features, x.coords, shape, 2)
    ours = submanifold_conv3d(x, subm.weight.detach())
    torch.testing.assert_close(ours.features, subm(sparse).features, rtol=1e-5, atol=1e-5)

    down = spconv.SparseConv3d(4, 6, 2, 2, bias=False, indice_key="down")
    up = spconv.SparseInverseConv3d(6, 4, 2, indice_key="down", bias=False)
    sp_coarse = down(sparse)
    coarse = strided_conv3d(x, down.weight.detach())
    sp_keys = (sp_coarse.indices.long() * torch.tensor([GRID**3, GRID**2, GRID, 1])).sum(dim=1)
    order = torch.argsort(sp_keys)
    assert torch.equal(coarse.coords, sp_coarse.indices[order])  # ours are sorted by key
    torch.testing.assert_close(coarse.features, sp_coarse.features[order], rtol=1e-5, atol=1e-5)
    fine = inverse_conv3d(coarse.replace_features(sp_coarse.features[order]), x, up.weight.detach())
    torch.testing.assert_close(fine.features, up(sp_coarse).features, rtol=1e-5, atol=1e-5)

    # Our modules with backend="spconv" (forced on CPU) against the torch backend, same weights.
    torch_convs, spconv_convs = (
        [
            SubmanifoldConv3d(4, 6, 3, backend=b),
            StridedConv3d(6, 8, backend=b),
            InverseConv3d(8, 6, backend=b),
        ]
        for b in ("torch", "spconv")
    )
    for a, b in zip(torch_convs, spconv_convs, strict=True):
        b.load_state_dict(a.state_dict())
    outputs = []
    for convs in (torch_convs, spconv_convs):
        with torch.no_grad():
            fine_out = convs[0](SparseTensor(x.coords, x.features, 2))
            outputs.append(convs[2](convs[1](fine_out), fine_out).features)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert all(conv._spconv_module is not None for conv in spconv_convs)  # spconv really ran

    # Whole backbones (eval: spconv's CPU build has no backward) with column-major coordinates from nonzero().
    coords = (torch.rand(2, GRID, GRID, GRID) < 0.15).nonzero().int()
    features = torch.randn(coords.shape[0], 4)
    for name in ("SpUNet-v1", "PTv3-lite-v1"):
        reference = build_backbone(name, 4, preset="tiny", conv_backend="torch").eval()
        accelerated = build_backbone(name, 4, preset="tiny", conv_backend="spconv").eval()
        accelerated.load_state_dict(reference.state_dict())
        with torch.no_grad():
            expected = reference(SparseTensor(coords, features, 2)).features
            torch.testing.assert_close(accelerated(SparseTensor(coords, features, 2)).features, expected)


# --- voxelisation ----------------------------------------------------------------------------------------------


def test_voxelize_round_trip_counts_and_mean_pooling():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat(
        [torch.rand(400, 3, generator=generator), torch.rand(300, 3, generator=generator) + 5.0]
    )
    batch = torch.cat([torch.zeros(400), torch.ones(300)]).long()
    features = torch.randn(700, 4, generator=generator, dtype=torch.float64)
    voxels = voxelize(points, 0.25, batch)

    # numpy reference: group points by (scene, floor((p - scene min) / size)).
    p, b = points.numpy(), batch.numpy()
    mins = np.stack([p[b == s].min(0) for s in (0, 1)])
    cells = np.floor((p - mins[b]) / 0.25).astype(np.int64)
    keys = [tuple([s, *c]) for s, c in zip(b.tolist(), cells.tolist(), strict=True)]
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    assert voxels.num_voxels == len(groups)
    voxel_keys = [tuple(c) for c in voxels.coords.tolist()]
    assert voxel_keys == sorted(groups)  # sorted by scene, then x, y, z
    assert voxels.counts.tolist() == [len(groups[k]) for k in voxel_keys]
    assert voxels.voxel_to_point.tolist() == [min(groups[k]) for k in voxel_keys]
    assert [voxel_keys[v] for v in voxels.point_to_voxel.tolist()] == keys

    pooled = voxels.pool(features)
    expected = np.stack([features.numpy()[groups[k]].mean(0) for k in voxel_keys])
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        voxels.pool(features, "max").numpy(),
        np.stack([features.numpy()[groups[k]].max(0) for k in voxel_keys]),
    )
    # Back to points: every point recovers its voxel's feature.
    np.testing.assert_allclose(voxels.unpool(pooled).numpy(), expected[[voxel_keys.index(k) for k in keys]])
    # Every point lies in its voxel's cell.
    offset = (points - voxels.point_voxel_centres()).abs()
    assert offset.max() <= 0.125 + 1e-5


def test_voxelize_is_translation_invariant_per_scene():
    points = torch.rand(200, 3)
    a, b = voxelize(points, 0.1), voxelize(points + torch.tensor([3.7, -2.0, 11.3]), 0.1)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.point_to_voxel, b.point_to_voxel)


# --- serialisation ---------------------------------------------------------------------------------------------


def cube(size):
    r = torch.arange(size)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def test_z_order_code_of_a_known_coordinate():
    # x = 011, y = 101, z = 110 interleave (x most significant in each triple) to 011 101 110.
    coords = torch.tensor([[3, 5, 6], [1, 0, 0], [0, 1, 0], [0, 0, 1], [65535, 0, 65535]])
    codes = z_order_encode(coords)
    assert codes[:4].tolist() == [0b011101110, 4, 2, 1]
    assert torch.equal(z_order_decode(codes), coords)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_hilbert_curve_visits_every_cell_once_through_neighbours(depth):
    cells = cube(1 << depth)
    codes = hilbert_encode(cells, depth)
    assert sorted(codes.tolist()) == list(range(cells.shape[0]))
    path = cells[torch.argsort(codes)]
    assert ((path[1:] - path[:-1]).abs().sum(dim=1) == 1).all()
    assert torch.equal(hilbert_decode(codes, depth), cells)


def test_hilbert_at_full_depth_stays_adjacent_on_a_small_cube():
    # Serialisation always uses MAX_DEPTH bits; a small scene is then a contiguous stretch of that curve.
    cells = cube(8)
    codes = hilbert_encode(cells, MAX_DEPTH)
    path = cells[torch.argsort(codes)]
    assert ((path[1:] - path[:-1]).abs().sum(dim=1) == 1).all()
    random_cells = torch.randint(0, 1 << MAX_DEPTH, (500, 3))
    assert torch.equal(hilbert_decode(hilbert_encode(random_cells, MAX_DEPTH), MAX_DEPTH), random_cells)


def test_serialization_orders_are_invertible_and_scene_major():
    x = random_sites(batch_size=3, seed=9)
    for s in serialize(x.coords):
        assert torch.equal(x.coords[s.order][s.inverse], x.coords)
        assert torch.equal(s.order[s.inverse], torch.arange(x.num_sites))
        assert (s.codes[s.order].diff() > 0).all()  # unique codes, sorted along the order
        assert (x.coords[s.order, 0].diff() >= 0).all()  # scenes one after the other


# --- attention, backbones, registry ---------------------------------------------------------------------------


def test_patch_attention_masks_padding():
    generator = torch.Generator().manual_seed(0)
    sizes = (70, 10)  # patches of 32: scene 0 -> 32, 32, 6 (+26 padding); scene 1 -> 10 (+22 padding)
    coords = torch.cat([torch.randperm(GRID**3, generator=generator)[:n] for n in sizes])
    coords = torch.stack([coords // GRID**2, coords // GRID % GRID, coords % GRID], dim=1)
    coords = torch.cat(
        [torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))[:, None], coords], 1
    ).int()
    qkv = torch.randn(sum(sizes), 3 * 8, generator=generator, dtype=torch.float64)
    serialization = serialize(coords, ("hilbert",))[0]
    layout = patch_layout(serialization, coords[:, 0].long(), 2, patch_size=32)
    assert layout.patch_size == 32 and layout.num_patches == 4 and layout.has_padding
    out = patch_attention(qkv, layout, num_heads=2)

    expected = torch.empty(sum(sizes), 8, dtype=torch.float64)
    start = 0
    for n in sizes:
        rows = serialization.order[start : start + n]
        for chunk in torch.split(rows, 32):  # unpadded patches, computed one by one
            q, k, v = qkv[chunk].view(-1, 3, 2, 4).permute(1, 2, 0, 3)
            attended = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v
            expected[chunk] = attended.transpose(0, 1).reshape(-1, 8)
        start += n
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def two_scenes(channels, seed=0):
    generator = torch.Generator().manual_seed(seed)
    points = torch.cat(
        [torch.rand(900, 3, generator=generator), torch.rand(400, 3, generator=generator) * 0.6]
    )
    batch = torch.cat([torch.zeros(900), torch.ones(400)]).long()
    voxels = voxelize(points, 0.05, batch)
    return voxels.sparse_tensor(torch.randn(voxels.num_voxels, channels, generator=generator))


@pytest.mark.parametrize("name", ["SpUNet-v1", "PTv3-lite-v1"])
def test_backbone_forward_backward_on_two_scenes(name):
    torch.manual_seed(0)
    x = two_scenes(6)
    backbone = build_backbone(name, 6, preset="tiny", conv_backend="torch")
    out = backbone(x)
    assert out.features.shape == (x.num_sites, backbone.out_channels)
    assert torch.equal(out.coords, x.coords)
    out.features.square().mean().backward()
    for pname, p in backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert sum(p.grad.abs().sum() > 0 for p in backbone.parameters()) == len(list(backbone.parameters()))


@pytest.mark.parametrize("name", ["SpUNet-v1", "PTv3-lite-v1"])
def test_backbone_scenes_do_not_leak_in_eval(name):
    torch.manual_seed(0)
    x = two_scenes(6, seed=1)
    backbone = build_backbone(name, 6, preset="tiny", conv_backend="torch").eval()
    with torch.no_grad():
        together = backbone(x).features
        for scene in (0, 1):
            rows = x.coords[:, 0] == scene
            coords = x.coords[rows].clone()
            coords[:, 0] = 0
            alone = backbone(SparseTensor(coords, x.features[rows], 1)).features
            torch.testing.assert_close(together[rows], alone, rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_scenes():
    drop = SceneDropPath(0.5).train()
    branch = torch.ones(1000, 4)
    batch = torch.arange(1000) % 8
    torch.manual_seed(0)
    out = drop(branch, batch, 8)
    per_scene = [out[batch == b].unique().tolist() for b in range(8)]
    assert all(values in ([0.0], [2.0]) for values in per_scene)
    assert [0.0] in per_scene and [2.0] in per_scene
    assert torch.equal(drop.eval()(branch, batch, 8), branch)


def test_registry_names_and_unknown_name():
    assert {"SpUNet-v1", "PTv3-lite-v1"} <= set(available_backbones())
    with pytest.raises(KeyError, match="Unknown backbone 'SpUNet-v9'.*PTv3-lite-v1.*SpUNet-v1"):
        build_backbone("SpUNet-v9", 6)
    with pytest.raises(ValueError, match="already registered"):
        BACKBONES.register("SpUNet-v1")(object)
    with pytest.raises(KeyError, match="Unknown preset 'huge'.*default, tiny"):
        build_backbone("SpUNet-v1", 6, preset="huge")
    with pytest.raises(TypeError, match="SpUNetConfig"):
        build_backbone("PTv3-lite-v1", 6, config=SpUNetConfig())
    registry = Registry("widget")

    @registry.register("Widget-v1")
    class Widget:
        pass

    assert registry.get("Widget-v1") is Widget and registry.names() == ["Widget-v1"]
    backbone = build_backbone("SpUNet-v1", 6, preset="tiny", stem_channels=4)
    assert backbone.config.stem_channels == 4 and backbone.config.encoder_channels == (8, 16)


# --- inputs and the Gaussian encoder ---------------------------------------------------------------------------


def splatfacto_gaussians(num, seed=0, extent=1.0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "means": torch.rand(num, 3, generator=generator) * extent,
        "features_dc": torch.randn(num, 3, generator=generator),
        "opacities": torch.randn(num, 1, generator=generator),
        "scales": torch.randn(num, 3, generator=generator) - 4.0,
        "quats": torch.randn(num, 4, generator=generator),
    }


def test_gaussian_input_channel_layout():
    means = torch.tensor([[0.3, 0.5, 0.9]])
    features = gaussian_input_features(
        means,
        features_dc=torch.zeros(1, 1, 3),  # splatfacto's [N, 1, 3] also works
        opacities=torch.zeros(1, 1),
        scales=torch.tensor([[-1.0, -2.0, -3.0]]),
        quats=torch.tensor([[-2.0, 0.0, 0.0, 0.0]]),
        reference=torch.tensor([[0.25, 0.5, 1.0]]),
        scale=0.5,
    )
    assert features.shape == (1, len(GAUSSIAN_CHANNELS)) == (1, 14)
    expected = [0.1, 0.0, -0.2, 0.5, 0.5, 0.5, 0.5, -1.0, -2.0, -3.0, 1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(features[0], torch.tensor(expected))


def test_pca_normals_face_the_room():
    xy = cube(10)[:100, 1:].float() / 10  # a 10 x 10 grid
    floor = torch.cat([xy, torch.zeros(100, 1)], dim=1)
    ceiling = torch.cat([xy, torch.ones(100, 1)], dim=1)
    normals = estimate_normals(torch.cat([floor, ceiling]), num_neighbours=8, chunk_size=64)
    torch.testing.assert_close(normals[:100], torch.tensor([0.0, 0.0, 1.0]).expand(100, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        normals[100:], torch.tensor([0.0, 0.0, -1.0]).expand(100, 3), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("backbone", ["SpUNet-v1", "PTv3-lite-v1"])
def test_gaussian_encoder_latents(backbone):
    torch.manual_seed(0)
    config = GaussianEncoderConfig(backbone=backbone, backbone_preset="tiny", voxel_size=0.05, latent_dim=32)
    encoder = GaussianEncoder(config)
    scenes = [splatfacto_gaussians(800, seed=1), splatfacto_gaussians(500, seed=2, extent=0.5)]
    latents = encoder.encode_scenes(scenes)  # training mode, two scenes in one pass
    assert [t.shape for t in latents] == [(800, 32), (500, 32)]
    sum(t.square().mean() for t in latents).backward()
    assert all(p.grad is not None for p in encoder.parameters())

    encoder.eval()
    gaussians = scenes[0]
    with torch.no_grad():
        latent = encoder.forward_gauss_params(gaussians)
        assert torch.equal(latent, encoder.forward_gauss_params(gaussians))  # deterministic in eval
        permutation = torch.randperm(800, generator=torch.Generator().manual_seed(3))
        shuffled = encoder.forward_gauss_params({k: v[permutation] for k, v in gaussians.items()})
        torch.testing.assert_close(shuffled, latent[permutation], rtol=1e-5, atol=1e-5)  # equivariant
        # Batched scenes give what each scene gives alone.
        together = encoder.encode_scenes(scenes)
        torch.testing.assert_close(together[0], latent, rtol=1e-5, atol=1e-5)


def test_gaussian_encoder_point_variant():
    torch.manual_seed(0)
    config = GaussianEncoderConfig(
        backbone_preset="tiny", voxel_size=0.05, input_variant="point", latent_dim=16
    )
    encoder = GaussianEncoder(config)
    gaussians = splatfacto_gaussians(300)
    latent = encoder(gaussians["means"], colors=torch.rand(300, 3))
    assert latent.shape == (300, 16) and encoder.in_channels == 9
    with pytest.raises(ValueError, match="needs colors"):
        encoder(gaussians["means"])


@gpu_only
def test_cuda_matches_cpu():
    x = random_sites(channels=4, seed=10, dtype=torch.float32)
    for name in ("SpUNet-v1", "PTv3-lite-v1"):
        torch.manual_seed(0)
        backbone = build_backbone(name, 4, preset="tiny", conv_backend="torch").eval()
        expected = backbone(x).features
        on_gpu = backbone.cuda()(x.to("cuda")).features
        torch.testing.assert_close(on_gpu.cpu(), expected, rtol=1e-4, atol=1e-4)
    weight = torch.randn(6, 3, 3, 3, 4)
    grads = []
    for device in ("cpu", "cuda"):
        features, w = leaf(x.features.to(device)), leaf(weight.to(device))
        out = submanifold_conv3d(SparseTensor(x.coords.to(device), features, 2), w)
        (out.features * torch.arange(6, device=device)).sum().backward()
        grads.append((out.features.cpu(), features.grad.cpu(), w.grad.cpu()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    encoder = GaussianEncoder(GaussianEncoderConfig(backbone_preset="tiny", voxel_size=0.05)).cuda()
    latent = encoder.forward_gauss_params({k: v.cuda() for k, v in splatfacto_gaussians(500).items()})
    latent.square().mean().backward()
    assert latent.shape == (500, 32) and all(p.grad is not None for p in encoder.parameters())


def test_scene_relative_positions():
    config = GaussianEncoderConfig(backbone_preset="tiny", voxel_size=0.05, position_reference="scene")
    encoder = GaussianEncoder(config)
    scenes = [splatfacto_gaussians(200, seed=4), splatfacto_gaussians(100, seed=5, extent=0.5)]
    scenes[1]["means"] += 10.0
    means = torch.cat([s["means"] for s in scenes])
    batch = torch.cat([torch.zeros(200), torch.ones(100)]).long()
    voxels = voxelize(means, 0.05, batch)
    joined = {k: torch.cat([s[k] for s in scenes]) for k in ("features_dc", "opacities", "scales", "quats")}
    inputs = encoder.input_features(voxels, means, **joined, batch=batch)
    for rows in (slice(0, 200), slice(200, 300)):
        centre = (means[rows].amin(0) + means[rows].amax(0)) / 2
        torch.testing.assert_close(inputs[rows, :3], means[rows] - centre)
    assert encoder(means, **joined, batch=batch).shape == (300, 32)


def test_batch_norm_statistics_keep_up_with_a_short_training_run():
    """Evaluation uses the running statistics: after a few dozen optimiser steps on one scene they must describe the
    current weights' features, or an encoder scores worse in eval mode than it trains (at momentum 0.01 the
    statistics trailed the weights by about a hundred steps)."""
    torch.manual_seed(0)
    x = two_scenes(6, seed=2)
    target = torch.randn(x.num_sites, 8, generator=torch.Generator().manual_seed(3))
    backbone = build_backbone("SpUNet-v1", 6, preset="tiny", conv_backend="torch")
    head = torch.nn.Linear(backbone.out_channels, 8)
    optimiser = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(40):
        loss = (head(backbone(x).features) - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        training = head(backbone(x).features)  # batch statistics (and one more update of the running ones)
        evaluated = head(backbone.eval()(x).features)
    gap = (evaluated - training).square().mean() / training.square().mean()
    assert gap < 0.05, f"eval-mode output differs from train-mode by {gap:.1%} of its energy"
