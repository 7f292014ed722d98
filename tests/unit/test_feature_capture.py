"""components.feature_capture: decoder features recorded from nnU-Net's networks, compiled or not."""

from __future__ import annotations

import copy

import pytest
import torch

from nnunet_semi.components.feature_capture import DecoderFeatures


@pytest.mark.parametrize("dim", [2, 3])
def test_decoder_features_are_the_full_resolution_input_of_the_last_head(dim):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d
    network = PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True, norm,
                            {"affine": True}, None, None, torch.nn.LeakyReLU, None, deep_supervision=True)
    x = torch.randn(2, 1, *([16] * dim))
    with DecoderFeatures(network) as captured:
        outputs = network(x)
    assert captured.features.shape == (2, 4, *([16] * dim))
    # the last segmentation layer applied to the captured features is the full-resolution output
    torch.testing.assert_close(network.decoder.seg_layers[-1](captured.features), outputs[0])
    # take() hands the features over and keeps no reference
    assert captured.take().shape == (2, 4, *([16] * dim))
    with pytest.raises(RuntimeError, match=r"nothing was recorded from decoder.stages\[-1\]"):
        captured.features
    # outside 'with' nothing is recorded, and asking for features then is a clear error, not None
    with captured:
        pass
    network(x)
    with pytest.raises(RuntimeError, match=r"nothing was recorded from decoder.stages\[-1\]"):
        captured.features
    # an EMA copy of the network carries an inert hook
    copy.deepcopy(network)(x)
    with pytest.raises(RuntimeError):
        captured.features


def test_decoder_features_are_recorded_by_a_compiled_network_after_another_was_compiled_without_the_hook():
    """torch.compile reuses a graph traced for another instance of the class (nnU-Net's stock run before ours in one
    process) unless it guards on hooks; then the hook would silently never run."""
    import torch._dynamo
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    def unet():
        return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True,
                             torch.nn.InstanceNorm3d, {"affine": True}, None, None, torch.nn.LeakyReLU, None,
                             deep_supervision=True)

    torch._dynamo.reset()
    x = torch.randn(1, 1, 16, 16, 16)
    torch.compile(unet(), backend="aot_eager")(x)  # a graph without the hook
    network = unet()
    captured = DecoderFeatures(network)
    compiled = torch.compile(network, backend="aot_eager")
    for _ in range(2):
        with captured:
            outputs = compiled(x)
        torch.testing.assert_close(network.decoder.seg_layers[-1](captured.features), outputs[0])
