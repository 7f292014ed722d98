"""components.networks and components.ensemble: the residual-encoder sibling and the dual-network ensemble."""

from __future__ import annotations

import pytest
import torch

from helpers import plain_unet_architecture
from nnunet_semi.components.ensemble import DualNetworkEnsemble, is_ensemble_state, member_state
from nnunet_semi.components.networks import RESIDUAL_ENCODER_UNET, build_network, residual_encoder_sibling


def test_residual_encoder_sibling_keeps_the_plans_geometry_with_residual_blocks():
    plain = plain_unet_architecture()
    sibling = residual_encoder_sibling(plain)
    assert sibling["network_class_name"] == RESIDUAL_ENCODER_UNET
    assert sibling["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4]
    assert "n_conv_per_stage" not in sibling["arch_kwargs"] and "n_conv_per_stage" in plain["arch_kwargs"]
    assert {k: v for k, v in sibling["arch_kwargs"].items() if k != "n_blocks_per_stage"} == \
        {k: v for k, v in plain["arch_kwargs"].items() if k != "n_conv_per_stage"}
    assert residual_encoder_sibling(plain, None)["arch_kwargs"]["n_blocks_per_stage"] == [2, 2, 2]
    assert residual_encoder_sibling(sibling) == sibling
    network = build_network(sibling, 1, 3, deep_supervision=False)
    assert type(network).__name__ == "ResidualEncoderUNet"
    assert network(torch.randn(1, 1, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="PlainConvUNet plans only"):
        residual_encoder_sibling(plain | {"network_class_name": "my.Net"})


@pytest.mark.parametrize("dim", [2, 3])
def test_dual_network_ensemble_deploys_either_network_or_the_softmax_average(dim):
    first = build_network(plain_unet_architecture(dim), 1, 3, deep_supervision=False).eval()
    second = build_network(residual_encoder_sibling(plain_unet_architecture(dim)), 1, 3, deep_supervision=False).eval()
    x = torch.randn(2, 1, *([8] * dim))
    ensemble = DualNetworkEnsemble(first, second, "ensemble").eval()
    with torch.no_grad():
        averaged = (torch.softmax(first(x), 1) + torch.softmax(second(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(ensemble(x), 1), averaged)
        state = ensemble.state_dict()
        assert is_ensemble_state(state) and state["deployed_member"].item() == 2

        # what nnUNetv2_predict does: build a fresh wrapper, load network_weights
        fresh = DualNetworkEnsemble(build_network(plain_unet_architecture(dim), 1, 3, False),
                                    build_network(residual_encoder_sibling(plain_unet_architecture(dim)), 1, 3,
                                                  False)).eval()
        fresh.load_state_dict(DualNetworkEnsemble(first, second, "second").state_dict())
        assert fresh.deployed == "second"
        torch.testing.assert_close(fresh(x), second(x))
        # single-network weights (checkpoints written during training) deploy the first network
        fresh.load_state_dict(first.state_dict())
        assert fresh.deployed == "first"
        torch.testing.assert_close(fresh(x), first(x))
        torch.testing.assert_close(member_state(state, "second")["decoder.seg_layers.0.weight"],
                                   second.state_dict()["decoder.seg_layers.0.weight"])


def test_features_per_stage_expands_a_single_int():
    from types import SimpleNamespace

    from nnunet_semi.components.networks import features_per_stage

    assert features_per_stage(SimpleNamespace(network_arch_init_kwargs={"n_stages": 3, "features_per_stage": 8})) \
        == [8, 8, 8]
    assert features_per_stage(SimpleNamespace(network_arch_init_kwargs=plain_unet_architecture()["arch_kwargs"])) \
        == [4, 8, 16]
