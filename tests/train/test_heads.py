"""MLP-Head, weight-normalised last layer and T-Head: semantics and official parameter names."""

import torch
import torch.nn.functional as F

from mokd_train.heads import MLPHead, THead, WeightNormLinear


def test_weight_norm_linear_rows_are_g_times_unit_v():
    torch.manual_seed(0)
    layer = WeightNormLinear(5, 7)
    with torch.no_grad():
        layer.weight_g.copy_(torch.rand(7, 1) + 0.5)
    v, g = layer.weight_v.detach(), layer.weight_g.detach()
    expected_weight = torch.stack([g[k, 0] * v[k] / v[k].norm() for k in range(7)])
    x = torch.randn(3, 5)
    assert torch.allclose(layer(x), x @ expected_weight.T, atol=1e-6)
    assert torch.allclose(layer.weight.norm(dim=1), g[:, 0], atol=1e-6)
    assert dict(layer.named_parameters()).keys() == {"weight_g", "weight_v"}
    assert layer.weight_g.shape == (7, 1) and layer.weight_v.shape == (7, 5)


def test_weight_norm_linear_starts_with_unit_rows():
    layer = WeightNormLinear(4, 6)
    assert torch.equal(layer.weight_g.detach(), torch.ones(6, 1))
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(6), atol=1e-6)


def test_mlp_head_matches_manual_computation_and_names():
    torch.manual_seed(0)
    head = MLPHead(12, 10, hidden_dim=8, bottleneck_dim=6)
    params = dict(head.named_parameters())
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "mlp.4.bias",
            "last_layer.weight_g", "last_layer.weight_v"} <= params.keys()
    assert not any(name.endswith("last_layer.bias") for name in params)
    x = torch.randn(3, 12)
    hidden = F.gelu(F.linear(x, params["mlp.0.weight"], params["mlp.0.bias"]))
    hidden = F.gelu(F.linear(hidden, params["mlp.2.weight"], params["mlp.2.bias"]))
    bottleneck = F.linear(hidden, params["mlp.4.weight"], params["mlp.4.bias"])
    unit = bottleneck / bottleneck.norm(dim=1, keepdim=True)
    v = params["last_layer.weight_v"]
    expected = unit @ (v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(head(x), expected, atol=1e-5)


def test_norm_last_layer_freezes_only_g():
    frozen, free = MLPHead(4, 5, 8, 3, norm_last_layer=True), MLPHead(4, 5, 8, 3, norm_last_layer=False)
    assert not frozen.last_layer.weight_g.requires_grad and frozen.last_layer.weight_v.requires_grad
    assert free.last_layer.weight_g.requires_grad


def test_cnn_thead_official_names_and_shapes():
    head = THead(in_dim=20, dim=12, out_dim=9, grid=4, conv_input=True, depth=3, num_heads=6)
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert shapes["pos_embed"] == (1, 16, 12)
    assert shapes["patch_embed.weight"] == (12, 20, 1, 1) and shapes["patch_embed.bias"] == (12,)
    assert shapes["blocks.2.attn.qkv.weight"] == (36, 12) and "blocks.2.attn.qkv.bias" in shapes
    assert shapes["blocks.0.mlp.fc1.weight"] == (48, 12)  # mlp ratio 4
    assert shapes["norm.weight"] == (12,)
    assert shapes["last_layer.weight_v"] == (9, 12) and shapes["last_layer.weight_g"] == (9, 1)
    assert not any(name.startswith(("blocks.3", "input_proj")) for name in shapes)
    assert head.last_layer.weight_g.requires_grad
    assert head.norm.eps == 1e-6 and head.blocks[0].norm1.eps == 1e-6


def test_vit_thead_projects_only_when_widths_differ():
    same = THead(in_dim=12, dim=12, out_dim=9, grid=4, conv_input=False)
    wider = THead(in_dim=8, dim=12, out_dim=9, grid=4, conv_input=False)
    same_names = {name for name, _ in same.named_parameters()}
    assert not any(name.startswith(("patch_embed", "input_proj")) for name in same_names)
    assert "input_proj.weight" in {name for name, _ in wider.named_parameters()}
    x = torch.randn(2, 8, 4, 4)
    tokens, _ = wider.tokens(x)
    expected = F.linear(x.flatten(2).transpose(1, 2), wider.input_proj.weight, wider.input_proj.bias) + wider.pos_embed
    assert torch.allclose(tokens, expected, atol=1e-6)


def test_thead_tokens_resize_pos_embed_officially_for_smaller_grids():
    torch.manual_seed(0)
    head = THead(in_dim=5, dim=6, out_dim=7, grid=4, conv_input=True, depth=1, num_heads=2)
    conv_w, conv_b = head.patch_embed.weight[:, :, 0, 0], head.patch_embed.bias
    for side in (4, 2):
        feature_map = torch.randn(3, 5, side, side)
        projected = torch.einsum("dc,bchw->bdhw", conv_w, feature_map) + conv_b[:, None, None]
        projected = projected.flatten(2).transpose(1, 2)
        grid_pos = head.pos_embed.reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
        pos = grid_pos if side == 4 else F.interpolate(grid_pos, scale_factor=((side + 0.1) / 4, (side + 0.1) / 4),
                                                       mode="bicubic", align_corners=False)  # official rule
        pos = pos.permute(0, 2, 3, 1).reshape(1, side * side, 6)
        tokens, x_pool = head.tokens(feature_map)
        assert torch.allclose(tokens, projected + pos, atol=1e-5)
        assert torch.allclose(x_pool, projected.mean(dim=1), atol=1e-5)  # query taken before the pos embed


def test_weight_norm_linear_gradients_equal_autograd_of_the_closed_form():
    """The hand-written backward against autograd through g * v / ||v|| written out here (float64), with g
    trainable (ViT heads) and frozen (CNN MLP-Heads), inputs with extra leading dimensions."""
    torch.manual_seed(0)
    for trainable_g in (True, False):
        layer = WeightNormLinear(5, 7).double()
        with torch.no_grad():
            layer.weight_g.uniform_(0.5, 2.0)
        layer.weight_g.requires_grad_(trainable_g)
        x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(2, 3, 7, dtype=torch.float64)
        v = layer.weight_v.detach().clone().requires_grad_(True)
        g = layer.weight_g.detach().clone().requires_grad_(trainable_g)
        x_ref = x.detach().clone().requires_grad_(True)
        reference = x_ref @ (g * v / (v * v).sum(dim=1, keepdim=True).sqrt()).T
        (reference * upstream).sum().backward()
        output = layer(x)
        (output * upstream).sum().backward()
        torch.testing.assert_close(output, reference, rtol=0, atol=1e-12)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.weight_v.grad, v.grad, rtol=0, atol=1e-12)
        if trainable_g:
            torch.testing.assert_close(layer.weight_g.grad, g.grad, rtol=0, atol=1e-12)
        else:
            assert layer.weight_g.grad is None


def test_weight_norm_linear_runs_under_autocast():
    torch.manual_seed(0)
    layer = WeightNormLinear(16, 32)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)
        output.float().sum().backward()
    torch.testing.assert_close(output.float(), x @ layer.weight.detach().T, rtol=2e-2, atol=2e-2)
    assert layer.weight_v.grad.dtype == torch.float32 and torch.isfinite(layer.weight_v.grad).all()


def test_thead_query_joins_attention_but_not_pooling():
    torch.manual_seed(0)
    head = THead(in_dim=6, dim=6, out_dim=5, grid=2, conv_input=False, depth=2, num_heads=2).eval()
    tokens = torch.randn(3, 4, 6)
    query = torch.randn(3, 6)
    x = torch.cat([query[:, None], tokens], dim=1)
    for block in head.blocks:
        x = block(x)
    expected = head.last_layer(head.norm(x)[:, 1:].mean(dim=1))
    assert torch.allclose(head.encode(tokens, query), expected, atol=1e-6)
    without_query = tokens
    for block in head.blocks:
        without_query = block(without_query)
    assert torch.allclose(head.encode(tokens), head.last_layer(head.norm(without_query).mean(dim=1)), atol=1e-6)
    assert not torch.allclose(head.encode(tokens, query), head.encode(tokens), atol=1e-4)


def test_thead_search_broadcast_equals_encoding_repeated_tokens():
    torch.manual_seed(0)
    head = THead(in_dim=5, dim=6, out_dim=7, grid=3, conv_input=True, depth=2, num_heads=2)
    tokens, _ = head.tokens(torch.randn(4, 5, 3, 3))
    queries = torch.randn(3 * 4, 6)  # 3 local crops of 4 images, view-major
    expected = head.encode(tokens.repeat(3, 1, 1), queries)
    torch.testing.assert_close(head.search(tokens, queries), expected, rtol=0, atol=0)


def test_mlp_head_with_batchnorm_standardises_hidden_features_over_the_batch():
    torch.manual_seed(0)
    head = MLPHead(5, 7, hidden_dim=6, bottleneck_dim=4, use_bn=True).train()
    assert [type(layer).__name__ for layer in head.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear",
                                                            "BatchNorm1d", "GELU", "Linear"]
    assert head.mlp[0].bias is None and head.mlp[3].bias is None  # cancelled by the BN anyway
    x = torch.randn(9, 5) * 4 + 2

    def standardise(h):
        return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)

    h = F.gelu(standardise(x @ head.mlp[0].weight.T))
    h = F.gelu(standardise(h @ head.mlp[3].weight.T))
    z = F.normalize(head.mlp[6](h), dim=-1)
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.T, rtol=1e-5, atol=1e-5)


def test_thead_l2_normalize_feeds_unit_pooled_tokens_to_the_last_layer():
    torch.manual_seed(0)
    plain = THead(in_dim=6, dim=6, out_dim=5, grid=2, conv_input=False, depth=1, num_heads=2).eval()
    normalised = THead(in_dim=6, dim=6, out_dim=5, grid=2, conv_input=False, depth=1, num_heads=2,
                       l2_normalize=True).eval()
    normalised.load_state_dict(plain.state_dict())
    tokens, query = torch.randn(3, 4, 6), torch.randn(3, 6)
    pooled = plain.pooled(tokens, query)
    torch.testing.assert_close(normalised.pooled(tokens, query), pooled / pooled.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(normalised.encode(tokens, query), plain.last_layer(F.normalize(pooled, dim=-1)))
    torch.testing.assert_close(normalised.search_pooled(tokens, query).norm(dim=-1), torch.ones(3))
