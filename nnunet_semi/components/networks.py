"""nnU-Net network architectures as plain plans dicts: the plans' own one and a residual-encoder sibling.

An architecture is what nnU-Net's plans hold per configuration under ``architecture``:
``{"network_class_name": ..., "arch_kwargs": {...}, "_kw_requires_import": [...]}``. Keeping the peer network of a
dual-network trainer in that form makes it buildable with nnU-Net's ``get_network_from_plans`` and writable into an
exported ``plans.json``.
"""

from __future__ import annotations

import copy

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESIDUAL_ENCODER_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnU-Net's ResEnc presets (M/L/XL): a ResNet-34-like encoder, as the dual network pairs V-Net with ResNet-34
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)


def plans_architecture(configuration_manager) -> dict:
    """The architecture dict of an nnU-Net configuration (a copy)."""
    return {"network_class_name": configuration_manager.network_arch_class_name,
            "arch_kwargs": copy.deepcopy(configuration_manager.network_arch_init_kwargs),
            "_kw_requires_import": list(configuration_manager.network_arch_init_kwargs_req_import)}


def features_per_stage(configuration_manager) -> list[int]:
    """Channels of every encoder stage of an nnU-Net configuration (the plans may give one int for all stages)."""
    kwargs = configuration_manager.network_arch_init_kwargs
    features = kwargs["features_per_stage"]
    return [features] * kwargs["n_stages"] if isinstance(features, int) else list(features)


def residual_encoder_sibling(architecture: dict, blocks_per_stage: tuple[int, ...] | None = RESENC_BLOCKS_PER_STAGE
                             ) -> dict:
    """A ``ResidualEncoderUNet`` with the same stages, features, kernels, strides, norm and decoder as a
    ``PlainConvUNet`` architecture (an architecture that already is a ``ResidualEncoderUNet`` is returned as is).

    Args:
        architecture: plans architecture dict of a PlainConvUNet or ResidualEncoderUNet.
        blocks_per_stage: residual blocks per encoder stage (truncated to the number of stages); None: the plain
            network's ``n_conv_per_stage``.
    """
    name = architecture["network_class_name"]
    if name == RESIDUAL_ENCODER_UNET:
        return copy.deepcopy(architecture)
    if name != PLAIN_CONV_UNET:
        raise ValueError(f"a residual-encoder sibling can be derived from {PLAIN_CONV_UNET} plans only, not {name}. "
                         f"Use a trainer variant whose network pair is ('plans', 'plans').")
    kwargs = copy.deepcopy(architecture["arch_kwargs"])
    num_stages = kwargs["n_stages"]
    convs = kwargs.pop("n_conv_per_stage")
    if blocks_per_stage is None:
        blocks = list(convs) if isinstance(convs, (list, tuple)) else [convs] * num_stages
    else:
        if len(blocks_per_stage) < num_stages:
            raise ValueError(f"blocks_per_stage has {len(blocks_per_stage)} entries, the plans have {num_stages} "
                             f"stages")
        blocks = list(blocks_per_stage[:num_stages])
    kwargs["n_blocks_per_stage"] = blocks
    return {"network_class_name": RESIDUAL_ENCODER_UNET, "arch_kwargs": kwargs,
            "_kw_requires_import": list(architecture["_kw_requires_import"])}


def build_network(architecture: dict, num_input_channels: int, num_output_channels: int,
                  deep_supervision: bool) -> nn.Module:
    """Instantiate an architecture dict with nnU-Net's ``get_network_from_plans`` (nnU-Net's weight init)."""
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], num_input_channels, num_output_channels,
                                  allow_init=True, deep_supervision=deep_supervision)
