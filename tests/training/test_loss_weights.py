"""Every loss-weight flag either reaches its loss, by exactly its factor, or is refused.

DCL applies lambda_GAN, lambda_NCE and lambda_IDT; SimDCL applies lambda_GAN and lambda_SIM and, as the
authors' code, no NCE or identity weight (spec 9.3). A weight the chosen model does not apply must not be
accepted and written to ``config.json`` while changing nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from training.config import ModelConfig, TrainConfig
from training.task import build_task
from training.train_cli import main

TINY = {
    "dcl": (ModelConfig(ngf=4, ndf=4, n_blocks=1, netf_nc=16, num_patches=16), 32),
    "simdcl": (ModelConfig(model="simdcl", ngf=4, ndf=4, n_blocks=1, netf_nc=8), 64),
}
# flag -> (model, the G-loss terms it multiplies, their coefficient in g/total)
WEIGHTS = {
    "lambda_gan": ("dcl", ("g/gan_ab", "g/gan_ba"), 0.5),
    "lambda_nce": ("dcl", ("g/nce_ab", "g/nce_ba"), 0.5),
    "lambda_idt": ("dcl", ("g/idt_a", "g/idt_b"), 0.5),
    "lambda_sim": ("simdcl", ("g/sim",), 1.0),
}


def g_losses(cfg: ModelConfig, size: int) -> dict[str, torch.Tensor]:
    """The G-side losses of one fixed batch: same seed, so the same weights, images and patch draws."""
    torch.manual_seed(0)
    task = build_task(cfg)
    task.build_heads(size)
    real_a, real_b = torch.rand(1, 3, size, size) * 2 - 1, torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        return task.g_losses(real_a, real_b, task.translate(real_a, real_b))


@pytest.mark.parametrize("name", WEIGHTS)
def test_each_weight_scales_its_terms_by_its_factor(name):
    model, terms, coefficient = WEIGHTS[name]
    cfg, size = TINY[model]
    base = g_losses(replace(cfg, **{name: 1.0}), size)
    tripled = g_losses(replace(cfg, **{name: 3.0}), size)
    for key, value in base.items():
        if key in terms:
            assert tripled[key].item() == pytest.approx(3.0 * value.item(), rel=1e-5), key
        elif key != "g/total":
            assert torch.equal(tripled[key], value), f"{name} changed {key}"
    added = 2.0 * coefficient * sum(base[t].item() for t in terms)
    assert tripled["g/total"].item() == pytest.approx(base["g/total"].item() + added, rel=1e-5)
    assert min(abs(base[t].item()) for t in terms) > 1e-3  # the terms exist, so the checks can fail


@pytest.mark.parametrize(
    ("model", "weight"), [("simdcl", "lambda_nce"), ("simdcl", "lambda_idt"), ("dcl", "lambda_sim")]
)
def test_a_weight_the_model_does_not_apply_is_refused(model, weight):
    flag = {"lambda_nce": "--lambda-NCE", "lambda_idt": "--lambda-IDT", "lambda_sim": "--lambda-SIM"}[weight]
    with pytest.raises(ValueError, match=f"^{flag} has no effect with --model {model}"):
        ModelConfig(model=model, **{weight: 2.0})


def test_the_cli_refuses_it_with_one_line_and_status_2(tmp_path, caplog):
    argv = ["--dataroot", str(tmp_path), "--checkpoints-dir", str(tmp_path), "--model", "simdcl"]
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--lambda-NCE", "2"]) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "--lambda-NCE has no effect with --model simdcl (its loss has no such weight)"
    ]
    assert not (tmp_path / "experiment").exists()  # nothing recorded


def test_the_recorded_configuration_names_only_applied_weights():
    dcl, simdcl = ModelConfig(), ModelConfig(model="simdcl")
    assert (dcl.lambda_nce, dcl.lambda_idt, dcl.lambda_sim) == (2.0, 1.0, None)
    assert (simdcl.lambda_nce, simdcl.lambda_idt, simdcl.lambda_sim) == (None, None, 10.0)
    assert TrainConfig.from_dict(TrainConfig(model=dcl).to_dict()).model == dcl


def test_records_from_before_the_refusal_still_load():
    # Earlier versions stored all three weights for both models; the unapplied ones never had an effect.
    for model in ("dcl", "simdcl"):
        record = TrainConfig(model=ModelConfig(model=model)).to_dict()
        record["model"].update(lambda_nce=2.0, lambda_idt=1.0, lambda_sim=10.0)
        assert TrainConfig.from_dict(record).model == ModelConfig(model=model)
