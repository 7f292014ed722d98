"""What a trained checkpoint holds, as its trainer says (``member_weights``, ``exportable_networks``): the one place
the benchmark's member scoring and the export learn a method's networks from."""

from __future__ import annotations

import pytest
import torch

from helpers import plain_unet_architecture
from nnunet_semi.components.ensemble import DualNetworkEnsemble
from nnunet_semi.components.networks import build_network, residual_encoder_sibling
from nnunet_semi.methods import nnUNetTrainerCPS, nnUNetTrainerDualCCE, nnUNetTrainerMeanTeacher


def _fresh_pair():
    plain = plain_unet_architecture(3)
    return (build_network(plain, 1, 3, deep_supervision=False).eval(),
            build_network(residual_encoder_sibling(plain), 1, 3, deep_supervision=False).eval())


@pytest.mark.parametrize("deployed", ["student", "ensemble"])
def test_dual_cce_members_make_the_deployable_model_predict_with_each_network(deployed):
    """Network 1 and the peer each alone, and their ensemble, from single-network weights (network 1 deployed) or
    an ensemble state (the ensemble deployed); the exportable networks are the two plain ones, the peer with its
    architecture."""
    first, second = _fresh_pair()
    network_weights = first.state_dict() if deployed == "student" else \
        DualNetworkEnsemble(first, second, "ensemble").state_dict()
    checkpoint = {"network_weights": network_weights,
                  "semi_state": {"auxiliary": {f"peer.{k}": v for k, v in second.state_dict().items()},
                                 "deployed_weights": deployed, "peer_architecture": {"network": "resenc"},
                                 "best_single_network": "peer"}}
    x = torch.randn(1, 1, 8, 8, 8)
    members = nnUNetTrainerDualCCE.member_weights(checkpoint)
    assert set(members) == {"student", "peer", "ensemble"}
    with torch.no_grad():
        expected = {"student": first(x), "peer": second(x),
                    "ensemble": DualNetworkEnsemble(first, second, "ensemble")(x)}
        for name, weights in members.items():
            model = DualNetworkEnsemble(*_fresh_pair())  # what nnU-Net's predictor builds, then loads
            model.load_state_dict(weights)
            torch.testing.assert_close(model.eval()(x), expected[name])
    exportable = nnUNetTrainerDualCCE.exportable_networks(checkpoint)
    assert set(exportable) == {"student", "peer"} and exportable["peer"][1] == {"network": "resenc"}
    assert exportable["student"][1] is None and nnUNetTrainerDualCCE.default_export(checkpoint) == "peer"
    one = _fresh_pair()[0]
    one.load_state_dict(exportable["student"][0])
    with torch.no_grad():
        torch.testing.assert_close(one(x), first(x))


def test_cps_and_mean_teacher_members_are_their_two_plain_networks():
    first, second = (build_network(plain_unet_architecture(3), 1, 2, deep_supervision=False) for _ in range(2))
    cps = {"network_weights": first.state_dict(),
           "semi_state": {"auxiliary": {f"peer.{k}": v for k, v in second.state_dict().items()},
                          "deployed_weights": "student"}}
    assert set(nnUNetTrainerCPS.member_weights(cps)) == {"student", "peer"}
    assert nnUNetTrainerCPS.member_weights(cps)["peer"].keys() == second.state_dict().keys()
    assert nnUNetTrainerCPS.default_export(cps) == "student"
    teacher_deployed = {"network_weights": second.state_dict(),
                        "semi_state": {"auxiliary": {f"student.{k}": v for k, v in first.state_dict().items()},
                                       "deployed_weights": "teacher"}}
    members = nnUNetTrainerMeanTeacher.member_weights(teacher_deployed)
    assert set(members) == {"teacher", "student"} and members["teacher"] is teacher_deployed["network_weights"]
    assert all(torch.equal(members["student"][k], v) for k, v in first.state_dict().items())
    assert set(nnUNetTrainerMeanTeacher.exportable_networks(teacher_deployed)) == {"teacher"}
    # a checkpoint without the other network (written before the teacher existed): nothing to score beside it
    assert nnUNetTrainerMeanTeacher.member_weights({"network_weights": {}, "semi_state": {
        "auxiliary": {}, "deployed_weights": "student"}}) == {}
