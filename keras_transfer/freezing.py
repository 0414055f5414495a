"""Freezing and unfreezing a model's backbone by blocks, with a BatchNorm policy."""

from __future__ import annotations

import difflib
import math

import keras
import numpy as np

from keras_transfer.backbones import backbone_blocks, get_backbone
from keras_transfer.builders import BN_POLICIES, InferenceBatchNormalization


def _layer_tree(layer):
    """The layer and all its sublayers, parents before children."""
    return layer._flatten_layers(include_self=True, recursive=True)


def _is_batch_norm(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def _uses_inference_batch_norm(model: keras.Model) -> bool:
    return any(
        isinstance(layer, InferenceBatchNormalization) for layer in _layer_tree(get_backbone(model))
    )


def resolve_bn_policy(model: keras.Model, bn_policy: str | None = None) -> str:
    """Returns the BatchNorm policy to apply, checked against how `model` was built.

    `"affine"` needs a model built with `bn_policy="affine"` (its BatchNorm
    layers always normalise with their moving statistics); such a model can
    only use `"affine"` or `"frozen"`.

    Args:
        model: a model with a `"backbone"` layer.
        bn_policy: `"frozen"`, `"affine"`, `"train"`, or None to infer
            (`"affine"` for a model built so, else `"frozen"`).

    Returns:
        The policy name.
    """
    affine_model = _uses_inference_batch_norm(model)
    if bn_policy is None:
        return "affine" if affine_model else "frozen"
    if bn_policy not in BN_POLICIES:
        raise ValueError(
            f"`bn_policy` must be one of {BN_POLICIES}. Received: bn_policy={bn_policy!r}"
        )
    if bn_policy == "affine" and not affine_model:
        raise ValueError(
            "bn_policy='affine' needs BatchNorm layers that stay in inference mode: "
            "build the model with build_image_classifier(..., bn_policy='affine'). "
            "Received: bn_policy='affine'"
        )
    if bn_policy == "train" and affine_model:
        raise ValueError(
            "bn_policy='train' needs ordinary BatchNorm layers, but this model was "
            "built with bn_policy='affine'. Received: bn_policy='train'"
        )
    return bn_policy


def freeze_backbone(model: keras.Model) -> keras.Model:
    """Freezes every layer of the model's backbone; the head stays trainable.

    Frozen BatchNorm layers run in inference mode: their moving statistics do
    not change during `fit`.

    Args:
        model: a model with a `"backbone"` layer.

    Returns:
        The same model, for chaining.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3), freeze_backbone=False)
    >>> kt.freeze_backbone(model).get_layer("backbone").trainable
    False
    """
    return unfreeze(model, blocks=0)


def unfreeze(
    model: keras.Model,
    what: str | None = None,
    *,
    blocks: int | None = None,
    fraction: float | None = None,
    from_layer: str | None = None,
    bn_policy: str | None = None,
) -> keras.Model:
    """Makes the top of the backbone trainable; everything below it frozen.

    The call sets the whole state (it is not cumulative), so the same call
    always gives the same trainable set. Layers outside the backbone (pooling,
    dropout, head) are made trainable.

    Args:
        model: a model with a `"backbone"` layer (or a bare backbone).
        what: `"all"` to unfreeze every block.
        blocks: number of top blocks to unfreeze (0 freezes the backbone).
        fraction: fraction of blocks to unfreeze, rounded up, in (0, 1].
        from_layer: name of a backbone layer; it and every later layer train.
        bn_policy: `"frozen"` (BatchNorm layers stay frozen), `"affine"`
            (gamma/beta train, statistics fixed) or `"train"`; None infers it
            from the model (see `resolve_bn_policy`).

    Returns:
        The same model, for chaining.

    Raises:
        ValueError: if not exactly one selector is given, or it is out of range.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> _ = kt.unfreeze(model, blocks=2)
    >>> [row["block"] for row in kt.trainable_summary(model, print_fn=None)
    ...  if row["trainable"]][:2]
    ['block10', 'top']
    """
    selectors = {
        "what": what,
        "blocks": blocks,
        "fraction": fraction,
        "from_layer": from_layer,
    }
    given = {key: value for key, value in selectors.items() if value is not None}
    if len(given) != 1:
        raise ValueError(
            "Pass exactly one of `what='all'`, `blocks`, `fraction`, `from_layer`. "
            f"Received: {given or 'none'}"
        )
    policy = resolve_bn_policy(model, bn_policy)
    backbone = get_backbone(model)
    all_blocks = backbone_blocks(model)
    layers = backbone.layers
    if what is not None:
        if what != "all":
            raise ValueError(f"`what` must be 'all'. Received: what={what!r}")
        first = 0
    elif blocks is not None:
        if (
            isinstance(blocks, bool)
            or not isinstance(blocks, (int, np.integer))
            or not (0 <= blocks <= len(all_blocks))
        ):
            raise ValueError(
                f"`blocks` must be an integer in [0, {len(all_blocks)}] (this backbone "
                f"has {len(all_blocks)} blocks). Received: blocks={blocks!r}"
            )
        first = _first_layer_of_top_blocks(layers, all_blocks, int(blocks))
    elif fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"`fraction` must be in (0, 1]. Received: fraction={fraction}")
        count = math.ceil(fraction * len(all_blocks))
        first = _first_layer_of_top_blocks(layers, all_blocks, count)
    else:
        names = [layer.name for layer in layers]
        if from_layer not in names:
            close = difflib.get_close_matches(from_layer, names, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(
                f"No layer named {from_layer!r} in the backbone.{hint} "
                f"Received: from_layer={from_layer!r}"
            )
        first = names.index(from_layer)

    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    # The container flag gates its sublayers' weights, so it must be on.
    backbone.trainable = True
    for index, layer in enumerate(layers):
        layer.trainable = index >= first
        if index >= first and policy == "frozen":
            for sublayer in _layer_tree(layer):
                if _is_batch_norm(sublayer):
                    sublayer.trainable = False
    if first >= len(layers):
        backbone.trainable = False
    return model


def _first_layer_of_top_blocks(layers, all_blocks, count: int) -> int:
    if count == 0:
        return len(layers)
    first_layer = all_blocks[len(all_blocks) - count].layers[0]
    return next(i for i, layer in enumerate(layers) if layer is first_layer)


def parameter_count(variables) -> int:
    """How many numbers the variables hold (shapes multiplied, summed).

    Args:
        variables: an iterable of variables (or anything with a `shape`).

    Returns:
        The count.

    Example:
    >>> import numpy as np
    >>> parameter_count([np.zeros((3, 4)), np.zeros(5)])
    17
    """
    return int(sum(math.prod(v.shape) for v in variables))


def trainable_summary(model: keras.Model, print_fn=print) -> list[dict]:
    """Counts trainable and frozen parameters per backbone block and for the head.

    BatchNorm moving statistics are never trainable, so they always count as
    frozen. LoRA adapters count in the block of the layer they adapt. The
    printed table ends with the trainable fraction of all parameters.

    Args:
        model: a model with a `"backbone"` layer.
        print_fn: where to print the table (`print` by default); None to only
            return the rows.

    Returns:
        A list of dicts `{"block", "trainable", "frozen"}`, backbone blocks
        from the stem up, then `"head"` (everything outside the backbone).

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> rows = kt.trainable_summary(model, print_fn=None)
    >>> rows[-1]["block"], rows[-1]["trainable"] > 0, rows[0]["trainable"]
    ('head', True, 0)
    """
    backbone = get_backbone(model)
    rows = []
    for block in backbone_blocks(model):
        trainable = {id(v): v for layer in block.layers for v in layer.trainable_weights}
        frozen = {
            id(v): v for layer in block.layers for v in layer.weights if id(v) not in trainable
        }
        rows.append(
            {
                "block": block.name,
                "trainable": parameter_count(trainable.values()),
                "frozen": parameter_count(frozen.values()),
            }
        )
    if backbone is not model:
        others = [layer for layer in model.layers if layer is not backbone]
        rows.append(
            {
                "block": "head",
                "trainable": parameter_count(v for lyr in others for v in lyr.trainable_weights),
                "frozen": parameter_count(v for lyr in others for v in lyr.non_trainable_weights),
            }
        )
    if print_fn is not None:
        width = max(len(row["block"]) for row in rows)
        print_fn(f"{'block':<{width}}  {'trainable':>12}  {'frozen':>12}")
        for row in rows:
            print_fn(f"{row['block']:<{width}}  {row['trainable']:>12,}  {row['frozen']:>12,}")
        total_t = sum(row["trainable"] for row in rows)
        total_f = sum(row["frozen"] for row in rows)
        print_fn(f"{'total':<{width}}  {total_t:>12,}  {total_f:>12,}")
        share = 100 * total_t / max(total_t + total_f, 1)
        print_fn(f"trainable fraction: {share:.2f}%")
    return rows
