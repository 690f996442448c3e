"""Networks against tensors produced by the authors' implementation (shared/reference/dclgan)."""

from __future__ import annotations

import pytest
import torch

from training.nets import MappingF, NLayerDiscriminator, PatchSampleF, ResnetGenerator
from training.nets.layers import Downsample, Upsample


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_antialias_ops_match_reference(load_ref):
    ref = load_ref("antialias_ops")
    down, up = Downsample(4), Upsample(4)
    assert torch.equal(down.filt, ref["down_filt"])
    assert max_abs(up.filt, ref["up_filt"]) == 0.0
    assert max_abs(down(ref["down_input"]), ref["down_output"]) <= 1e-6
    assert max_abs(up(ref["up_input"]), ref["up_output"]) <= 1e-6


def test_generator_output_and_nce_features(load_ref):
    ref = load_ref("generator")
    cfg = ref["config"]
    gen = ResnetGenerator(3, 3, ngf=cfg["ngf"], n_blocks=cfg["n_blocks"]).eval()
    gen.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        out = gen(ref["input"])
        feats = gen.encode(ref["input"], ref["nce_layers"])
    assert max_abs(out, ref["output"]) <= 1e-4
    assert len(feats) == len(ref["nce_feats"])
    for got, want in zip(feats, ref["nce_feats"], strict=True):
        assert got.shape == want.shape
        assert max_abs(got, want) <= 1e-4 * want.abs().max().item()


def test_generator_layer_shapes_and_stats(load_ref):
    ref = load_ref("generator")
    gen = ResnetGenerator(3, 3, ngf=ref["config"]["ngf"], n_blocks=ref["config"]["n_blocks"])
    gen.load_state_dict(ref["state_dict"])
    x = ref["input"]
    with torch.no_grad():
        for index, layer in enumerate(gen.model):
            x = layer(x)
            assert list(x.shape) == list(ref["layer_shapes"][index]), f"layer {index}"
            stats = torch.tensor([x.mean(), x.std(), x.abs().mean()], dtype=torch.float64)
            want = ref["layer_stats"][index]
            assert torch.allclose(stats, want, rtol=1e-4, atol=1e-5), f"layer {index}: {stats} vs {want}"


def test_forward_with_features_equals_encode(load_ref):
    ref = load_ref("generator")
    gen = ResnetGenerator(3, 3, ngf=16, n_blocks=9)
    gen.load_state_dict(ref["state_dict"])
    with torch.no_grad():
        out, feats = gen.forward_with_features(ref["input"], [4, 8, 12, 16])
    assert torch.equal(out, gen(ref["input"]))
    for got, want in zip(feats, ref["nce_feats"][1:], strict=True):
        assert max_abs(got, want) <= 1e-4 * want.abs().max().item()


def test_default_generator_has_official_key_layout():
    gen = ResnetGenerator()
    keys = gen.state_dict().keys()
    assert len(keys) == 52
    assert {"model.7.filt", "model.11.filt", "model.21.filt", "model.25.filt", "model.30.bias"} <= set(keys)
    assert sum(p.numel() for p in gen.parameters()) == 11_378_179


def test_discriminator_output_and_losses(load_ref):
    from training.losses import gan_loss

    ref = load_ref("discriminator")
    disc = NLayerDiscriminator(3, ndf=ref["config"]["ndf"], n_layers=3)
    disc.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        out = disc(ref["input"])
    assert out.shape == ref["output"].shape
    assert max_abs(out, ref["output"]) <= 1e-5
    for mode in ("hinge", "lsgan"):
        for real in (True, False):
            want = ref[f"{mode}_{'real' if real else 'fake'}"]
            assert abs(gan_loss(out, real, mode).item() - want.item()) <= 1e-6
    assert sum(p.numel() for p in NLayerDiscriminator().parameters()) == 2_764_737


def test_patch_sample_f_with_stored_ids(load_ref):
    ref = load_ref("patch_sample_f")
    nc = ref["config"]["nc"] if "nc" in ref["config"] else 64
    key_head, query_head = PatchSampleF(nc), PatchSampleF(nc)
    channels = [f.shape[1] for f in ref["feats"]]
    key_head.build(channels)
    query_head.build(channels)
    key_head.load_state_dict(ref["state_dict_key_head"], strict=True)
    query_head.load_state_dict(ref["state_dict_query_head"], strict=True)
    with torch.no_grad():
        out_k, ids = key_head(ref["feats"], 256, ref["patch_ids"])
        out_q, _ = query_head(ref["feats"], 256, ids)
    for got, want in zip(out_k + out_q, ref["out_k"] + ref["out_q"], strict=True):
        assert got.shape == want.shape
        assert max_abs(got, want) <= 1e-6


def test_patch_sample_f_draws_shared_ids_when_none_given():
    head = PatchSampleF(8)
    feats = [torch.randn(2, 4, 5, 5), torch.randn(2, 6, 20, 20)]
    with pytest.raises(RuntimeError, match="build"):  # no lazy creation: its optimiser would miss the MLPs
        head(feats, num_patches=16)
    head.build([4, 6])
    out, ids = head(feats, num_patches=16)
    assert [i.numel() for i in ids] == [16, 16]
    assert len(set(ids[1].tolist())) == 16  # without replacement
    assert out[0].shape == (32, 8)
    assert torch.allclose(out[1].norm(dim=1), torch.ones(32), atol=1e-5)


def test_simdcl_heads(load_ref):
    from training.losses import similarity_l1

    ref = load_ref("simdcl_heads")
    x1 = ref["input_x1"]
    x2 = x1.flip(1)
    heads = {}
    for name in ("F3", "F4", "F5", "F6"):
        heads[name] = MappingF()
        heads[name].load_state_dict(ref[f"state_dict_{name}"], strict=True)
    with torch.no_grad():
        outs = {
            "F3": heads["F3"](x1),
            "F4": heads["F4"](x2),
            "F5": heads["F5"](x1),
            "F6": heads["F6"](x2),
        }
    for name, inp in (("F3", "x1"), ("F4", "x2"), ("F5", "x1"), ("F6", "x2")):
        assert max_abs(outs[name], ref[f"out_{name}_{inp}"]) <= 1e-6
    loss = 10 * (similarity_l1(outs["F3"], outs["F6"]) + similarity_l1(outs["F4"], outs["F5"]))
    assert abs(loss.item() - ref["loss_sim_weighted"].item()) <= 1e-5


def test_l2_normalize_is_the_authors_and_has_a_finite_gradient_at_a_zero_row():
    from training.nets.heads import l2_normalize

    x = torch.randn(5, 8)
    x[2] = 0.0  # an all-zero patch embedding, as post-ReLU zeros through zero-bias linears give
    x.requires_grad_(True)
    y = l2_normalize(x)
    assert torch.equal(y[2], torch.zeros(8))
    want = x.detach() / (x.detach().pow(2).sum(1, keepdim=True).sqrt() + 1e-7)  # the authors' formula
    assert (y - want).abs().max() <= 1e-6
    y.sum().backward()
    assert torch.isfinite(x.grad).all()  # the authors' sqrt gives NaN here, and Adam spreads it everywhere
