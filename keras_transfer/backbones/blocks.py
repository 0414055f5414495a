"""Ordered layer groups ("blocks") of a backbone, for freezing and layer-wise LRs.

A block is a run of consecutive layers (in the model's topological order) that
freezing, unfreezing and discriminative learning rates treat as one unit:
the stem, each stage or block of the architecture, and the top. Blocks are
found from layer names, so they are recovered from a reloaded `.keras` model
without extra metadata: each rule has a signature (a layer name only that
family has) and a grouping function.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import keras

from keras_transfer.backbones.registry import BACKBONE_NAME


class Block(NamedTuple):
    """One ordered group of backbone layers.

    Attributes:
        name: e.g. `"stem"`, `"block3"`, `"top"`.
        layers: the layers of the group, in model order.
    """

    name: str
    layers: tuple


_Grouper = Callable[[Sequence[keras.layers.Layer]], list[Block]]


def _by_name(rules: Sequence[tuple[str, Callable[[re.Match], str]]]) -> _Grouper:
    """Groups layers by the first rule whose regex matches the layer name.

    A layer no rule matches joins the group of the layer before it (or the
    stem, at the start): activations, pads and adds travel with their block.
    """
    compiled = [(re.compile(pattern), name_fn) for pattern, name_fn in rules]

    def group(layers):
        groups: dict[str, list] = {}
        current = "stem"
        for layer in layers:
            for pattern, name_fn in compiled:
                match = pattern.search(layer.name)
                if match:
                    current = name_fn(match)
                    break
            groups.setdefault(current, []).append(layer)
        return [Block(name, tuple(members)) for name, members in groups.items()]

    return group


def _by_boundary(boundary: str, rename: Callable[[str], str], stem_max_pools: int) -> _Grouper:
    """Closes a group at each layer whose name matches `boundary`.

    For Inception-style graphs the branch layers carry generated names and only
    the layer that joins the branches is named, so a block ends there. The stem
    ends at its `stem_max_pools`-th max-pooling layer, or with the first group
    when `stem_max_pools` is 0.
    """
    pattern = re.compile(boundary)

    def group(layers):
        blocks, members, pools = [], [], 0
        # Without stem pools, the first boundary group is the stem.
        in_stem = stem_max_pools > 0
        for layer in layers:
            members.append(layer)
            if in_stem and isinstance(layer, keras.layers.MaxPooling2D):
                pools += 1
                if pools == stem_max_pools:
                    blocks.append(Block("stem", tuple(members)))
                    members, in_stem = [], False
            elif pattern.fullmatch(layer.name):
                name = rename(layer.name) if blocks else "stem"
                blocks.append(Block(name, tuple(members)))
                members = []
        if members:
            blocks.append(Block("top", tuple(members)))
        return blocks

    return group


def _fixed(name: str) -> Callable[[re.Match], str]:
    return lambda match: name


def _first_group(match: re.Match) -> str:
    return match.group(1)


def _fmt(template: str, offset: int = 0) -> Callable[[re.Match], str]:
    return lambda match: template.format(int(match.group(1)) + offset)


# rule name -> (signature regex matched against layer names, grouper).
# Signatures are tried in this order; the first match wins.
_RULES: dict[str, tuple[str, _Grouper]] = {
    "inception_resnet_v2": (
        r"^mixed_5b$",
        _by_boundary(
            r"mixed_(5b|6a|7a)|block(35|17|8)_\d+_ac|block8_10_conv",
            lambda name: re.sub(r"_(ac|conv)$", "", name),
            stem_max_pools=2,
        ),
    ),
    "inception_v3": (
        r"^mixed10$",
        _by_boundary(r"mixed\d+", lambda name: name, stem_max_pools=2),
    ),
    "nasnet": (
        r"^stem_bn1$",
        # Cells interleave in topological order; each ends at its concat.
        _by_boundary(
            r"(normal|reduction)_concat_.*",
            lambda name: "cell_" + re.sub(r"^(normal|reduction)_concat_", "", name),
            stem_max_pools=0,
        ),
    ),
    "convnext": (
        r"_stage_0_block_0_",
        _by_name(
            [
                (r"_stage_(\d+)_", _fmt("stage{}")),
                # downsampling_block_k sits between stage k and stage k + 1.
                (r"_downsampling_block_(\d+)$", _fmt("stage{}", offset=1)),
                (r"^layer_normalization", _fixed("top")),
            ]
        ),
    ),
    "efficientnet": (
        r"^block1a_",
        _by_name([(r"^block(\d+)[a-z]_", _fmt("block{}")), (r"^top_", _fixed("top"))]),
    ),
    "mobilenet_v3": (
        r"^expanded_conv_project_bn$",
        _by_name(
            [
                (r"^expanded_conv_(\d+)_", _fmt("block{}")),
                (r"^expanded_conv_", _fixed("block0")),
                (r"^conv_1", _fixed("top")),
            ]
        ),
    ),
    "mobilenet_v2": (
        r"^bn_Conv1$",
        _by_name(
            [
                (r"^expanded_conv_", _fixed("block0")),
                (r"^block_(\d+)_", _fmt("block{}")),
                (r"^(Conv_1|out_relu)", _fixed("top")),
            ]
        ),
    ),
    "mobilenet": (
        r"^conv_dw_1$",
        _by_name([(r"^conv_(?:dw|pw|pad)_(\d+)", _fmt("block{}"))]),
    ),
    "densenet": (
        r"^conv\d_block\d+_concat$",
        _by_name(
            [
                (r"^conv(\d+)_block", _fmt("stage{}")),
                # The transition after stage k is named pool{k}_*.
                (r"^pool(\d+)_", _fmt("stage{}")),
                (r"^(bn|relu)$", _fixed("top")),
            ]
        ),
    ),
    "resnet": (
        r"^conv\d_block\d+_out$",
        _by_name(
            [
                (r"^conv(\d+)_block", _fmt("conv{}")),
                (r"^post_", _fixed("top")),
            ]
        ),
    ),
    # KerasHub transformer backbones (BERT, ...): embeddings, layers, top.
    "transformer": (
        r"^transformer_layer_0$",
        _by_name(
            [
                (r"^transformer_layer_(\d+)$", _fmt("layer{}")),
                (r"^pooled_dense$", _fixed("top")),
            ]
        ),
    ),
    # KerasHub image backbones (`kerashub_image`). EfficientNetBackbone keeps
    # the keras.applications names (block1a_...) and uses "efficientnet".
    "kerashub_resnet": (
        r"^stack0_block0_out$",
        _by_name([(r"^stack(\d+)_", _fmt("stack{}")), (r"^post_", _fixed("top"))]),
    ),
    "kerashub_mobilenet": (
        r"^input_batch_norm$",
        # block_0 is the depthwise block; block_k_i is block i of stage k; the
        # last stage is the final 1x1 conv.
        _by_name([(r"^block_(\d+)_", _fmt("block{}"))]),
    ),
    "vit": (
        r"^vit_patching_and_embedding$",
        _by_name(
            [
                (r"^transformer_block_(\d+)$", _fmt("layer{}", offset=-1)),
                (r"^ln$", _fixed("top")),
            ]
        ),
    ),
    "xception": (r"^block14_sepconv2$", _by_name([(r"^(block\d+)_", _first_group)])),
    "vgg": (r"^block1_pool$", _by_name([(r"^(block\d+)_", _first_group)])),
}

GENERIC_RULE = "generic"


def _generic(layers):
    """One block per layer with weights: the fallback for a user's own model."""
    blocks, pending = [], []
    for layer in layers:
        pending.append(layer)
        if layer.weights:
            blocks.append(Block(layer.name, tuple(pending)))
            pending = []
    if pending and blocks:
        last = blocks.pop()
        blocks.append(Block(last.name, last.layers + tuple(pending)))
    return blocks


def get_backbone(model: keras.Model) -> keras.Model:
    """Returns the nested layer named `"backbone"`, or `model` if it has none.

    Args:
        model: a model built by `keras_transfer` or a bare backbone.

    Returns:
        The backbone `keras.Model`.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> kt.get_backbone(model).name
    'backbone'
    """
    for layer in model.layers:
        if layer.name == BACKBONE_NAME:
            return layer
    return model


def detect_block_rule(backbone: keras.Model) -> str:
    """Returns the name of the block rule that fits a backbone's layer names."""
    names = [layer.name for layer in backbone.layers]
    for rule, (signature, _) in _RULES.items():
        pattern = re.compile(signature)
        if any(pattern.search(name) for name in names):
            return rule
    return GENERIC_RULE


def backbone_blocks(model: keras.Model) -> list[Block]:
    """Splits a backbone into its ordered blocks, lowest (input side) first.

    Works on a classifier built by `keras_transfer` (its `"backbone"` layer is
    used), on a bare backbone, and on a model reloaded from a `.keras` file.
    Blocks without weights are dropped. A backbone of no known family gets one
    block per layer with weights.

    Args:
        model: a model with a `"backbone"` layer, or a backbone.

    Returns:
        A list of `Block(name, layers)`, from the stem to the top.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> [b.name for b in kt.backbone_blocks(model)][:3]
    ['stem', 'block0', 'block1']
    """
    backbone = get_backbone(model)
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    rule = detect_block_rule(backbone)
    grouper = _generic if rule == GENERIC_RULE else _RULES[rule][1]
    return [block for block in grouper(layers) if _has_weights(block)]


def _has_weights(block: Block) -> bool:
    return any(layer.weights for layer in block.layers)
