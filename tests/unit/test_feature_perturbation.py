"""components.feature_perturbation: the encoder/decoder split and channel dropout."""

from __future__ import annotations

import pytest
import torch

from helpers import plain_unet_architecture
from nnunet_semi.components.feature_perturbation import channel_dropout, dropout_skips, encoder_and_decoder
from nnunet_semi.components.networks import build_network


@pytest.mark.parametrize("dim", [2, 3])
def test_encoder_then_decoder_is_the_network_and_dropped_skips_change_only_the_decoded_output(dim):
    network = build_network(plain_unet_architecture(dim), 1, 3, deep_supervision=False).eval()
    encoder, decoder = encoder_and_decoder(network)
    x = torch.randn(2, 1, *([8] * dim))
    skips = encoder(x)
    assert [s.shape[1] for s in skips] == [4, 8, 16]
    torch.testing.assert_close(decoder(skips), network(x))
    assert not torch.allclose(decoder(dropout_skips(skips, 0.5)), network(x))
    with pytest.raises(TypeError, match="encoder returning skips"):
        encoder_and_decoder(torch.nn.Conv3d(1, 1, 1))


def test_channel_dropout_drops_whole_channels_and_keeps_the_expectation():
    torch.manual_seed(0)
    features = torch.ones(64, 32, 3, 3, 3)
    dropped = channel_dropout(features, 0.5)
    per_channel = dropped.flatten(2)
    assert ((per_channel == 0).all(2) | (per_channel == 2).all(2)).all()  # a channel is dropped entirely or x2
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="p must be"):
        channel_dropout(features, 1.0)


def test_channel_dropout_on_outputs_acts_only_inside_with_and_draws_from_the_generator():
    from torch import nn

    from nnunet_semi.components.feature_perturbation import ChannelDropoutOnOutputs

    network = nn.Sequential(nn.Conv3d(1, 8, 1), nn.Identity())
    network.eval()
    x = torch.randn(2, 1, 4, 4, 4)
    plain = network(x)
    dropout = ChannelDropoutOnOutputs([network[0]], p=0.5)
    torch.testing.assert_close(network(x), plain)  # inert outside `with`
    with dropout.active(torch.Generator().manual_seed(1)):
        dropped = network(x)
    with dropout.active(torch.Generator().manual_seed(1)):
        again = network(x)
    torch.testing.assert_close(dropped, again)  # the generator decides
    per_channel = dropped.flatten(2)
    zero = (per_channel == 0).all(-1)
    assert zero.any() and (~zero).any()  # whole channels dropped, others kept
    torch.testing.assert_close(per_channel[~zero], 2 * plain.flatten(2)[~zero])  # rescaled by 1 / (1 - p)
    dropout.remove()
    with dropout.active():
        torch.testing.assert_close(network(x), plain)
