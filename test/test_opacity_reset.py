"""The opacity reset (ours: gsplat 1.5.3's DefaultStrategy never applies its own)."""

from __future__ import annotations

import pytest
import torch

from m3_memory.core.gaussians import reset_opacities


def test_reset_clamps_opacities_and_zeroes_their_adam_moments():
    logits = torch.logit(torch.tensor([0.001, 0.005, 0.3, 0.9]))
    params = torch.nn.ParameterDict({"opacities": torch.nn.Parameter(logits.clone())})
    optimizer = torch.optim.Adam([params["opacities"]], lr=0.05)
    for _ in range(3):
        (params["opacities"] * torch.tensor([1.0, -2.0, 3.0, -4.0])).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    param, before = params["opacities"], params["opacities"].detach().clone()
    steps = optimizer.state[param]["step"].clone()
    reset_opacities(params, optimizer, 0.01)
    assert params["opacities"] is param and optimizer.param_groups[0]["params"][0] is param  # in place
    opacity = torch.sigmoid(param.detach())
    assert opacity.max() <= 0.01 + 1e-7
    low = torch.sigmoid(before) < 0.01
    assert low.any() and torch.equal(param.detach()[low], before[low])  # below the ceiling: untouched
    assert torch.count_nonzero(optimizer.state[param]["exp_avg"]) == 0
    assert torch.count_nonzero(optimizer.state[param]["exp_avg_sq"]) == 0
    assert torch.equal(optimizer.state[param]["step"], steps)


def test_reset_rejects_a_ceiling_outside_the_unit_interval():
    params = torch.nn.ParameterDict({"opacities": torch.nn.Parameter(torch.zeros(3))})
    with pytest.raises(ValueError, match="ceiling"):
        reset_opacities(params, torch.optim.Adam([params["opacities"]]), 1.0)


@pytest.mark.parametrize("reset", [False, True])
def test_training_applies_the_reset_at_its_step(tmp_path, reset):
    from m3_memory.core.pipeline import load_train_config, scene_features
    from m3_memory.core.scene import Scene
    from m3_memory.core.trainer import train
    from m3_memory.sim import demo_scene

    root = demo_scene("tiny")
    scene = Scene.load(root)
    # the reset at step 10 is the last thing the 11 iterations do; no refinement in between
    config = load_train_config(None, {"iterations": 11, "densify": {
        "refine_start_iter": 100, "refine_stop_iter": 100, "reset_every": 10, "reset_opacity": reset}})
    memory = train(scene, scene_features(scene, root, ["m3-tinyvlm"]), config, tmp_path / "memory.pt")
    top = float(memory.gaussians.opacity.max())
    assert top <= 0.01 + 1e-6 if reset else top > 0.05
