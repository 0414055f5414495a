"""LoRA: low-rank adapters on a frozen backbone, for text and image models.

`enable` adds trainable rank-`r` adapters `A @ B` beside frozen kernels
(the layer computes with `kernel + alpha / rank * A @ B`, Hu et al. 2021)
through Keras core's `layer.enable_lora`, which `Dense`, `EinsumDense`,
`Embedding` and `Conv1D/2D/3D` have. The default targets are the attention
query and value projections of transformer backbones (what KerasHub's
`Backbone.enable_lora` picks, and the LoRA paper's choice) and, for CNNs,
every convolution kernel that Keras can adapt; `DepthwiseConv2D` and
`SeparableConv2D` have no `enable_lora`, so they stay frozen and the report
says so. KerasHub offers LoRA for its text backbones only (and without an
alpha); LoRA on `keras.applications` CNNs is this module's own.

Two Keras behaviours shape the saving (Keras 3.15, keras#23243/#23244):
saving a LoRA layer writes its *merged* kernel, but its config keeps
`lora_rank`, so reloading re-adds zero adapters over a kernel that can no
longer be told apart from the base; and `Dense.build` drops `lora_alpha`
when it re-enables them. So adapters live in a file of their own
(`save_adapters` / `load_adapters`, a few hundred KB with rank, alpha and
targets recorded) next to the base model, and `merge` returns a plain model
(merged kernels, no adapter variables, no `lora_rank` in any config): that
is what `kt.export` and `.keras` files should get.

Example:
>>> import keras_transfer as kt
>>> model = kt.build_image_classifier("mobilenet_v3_small", 3, weights=None,
...                                   input_shape=(32, 32, 3), alpha=0.75)
>>> report = kt.lora.enable(model, rank=4)
>>> report.trainable_fraction < 0.2, len(report.skipped) > 0
(True, True)
>>> plain = kt.lora.merge(model)
>>> any("lora" in v.path for v in plain.weights)
False
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator, Sequence

import keras
import numpy as np

from keras_transfer.backbones.blocks import get_backbone
from keras_transfer.freezing import parameter_count
from keras_transfer.staging import write_atomic

# Layer names of the attention query / value projections: KerasHub's own
# default LoRA targets (`Backbone.get_lora_target_names`) and Keras's
# `MultiHeadAttention` sublayers.
ATTENTION_TARGETS = ("query", "value", "query_dense", "value_dense")
AUTO = "auto"
ADAPTER_NAMES = ("lora_kernel_a", "lora_kernel_b")
# Extension of adapter files (a NumPy `.npz`: arrays plus a JSON record).
ADAPTER_SUFFIX = ".lora.npz"
_META_KEY = "__lora__"
_LORA_CONFIG_KEYS = ("lora_rank", "lora_alpha")


@dataclasses.dataclass(frozen=True)
class LoraReport:
    """What `enable` adapted.

    Attributes:
        rank: adapter rank.
        alpha: adapter scale numerator (the update is `alpha / rank * A @ B`).
        targets: the target patterns asked for.
        layers: paths of the adapted layers.
        skipped: `path: reason` of matched layers that cannot take adapters.
        adapter_params: parameters in the adapters.
        trainable_params: parameters that train (adapters plus the head).
        total_params: all parameters of the model (adapters included).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[str, ...]
    skipped: tuple[str, ...]
    adapter_params: int
    trainable_params: int
    total_params: int

    @property
    def trainable_fraction(self) -> float:
        """Trainable parameters / all parameters."""
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        lines = [
            f"LoRA rank {self.rank}, alpha {self.alpha:g}: {len(self.layers)} layers adapted, "
            f"{self.adapter_params:,} adapter parameters; trainable "
            f"{self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_fraction:.2f}%)."
        ]
        if self.skipped:
            lines.append(
                f"Skipped {len(self.skipped)} layers without LoRA support in Keras (they stay "
                f"frozen): "
                + ", ".join(self.skipped[:5])
                + (" ..." if len(self.skipped) > 5 else "")
            )
        return "\n".join(lines)


def _named_layers(layer: keras.layers.Layer, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every sublayer under `layer` with its path of layer names, parents first."""
    seen = set()

    def walk(parent, path):
        for child in getattr(parent, "_layers", []):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}{child.name}"
            yield child_path, child
            yield from walk(child, f"{child_path}/")

    yield from walk(layer, prefix)


def _leaf(layer) -> bool:
    return not getattr(layer, "_layers", None)


def lora_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The layers of `model` that carry LoRA adapters, by path.

    Args:
        model: any Keras model.

    Returns:
        `{path: layer}` for every layer with `lora_enabled`.

    Example:
    >>> import keras
    >>> lora_layers(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    {}
    """
    return {
        path: layer for path, layer in _named_layers(model) if getattr(layer, "lora_enabled", False)
    }


def check_options(rank, alpha=None, targets=AUTO, *, prefix: str = "") -> tuple[str, ...]:
    """Validates LoRA options; returns the targets as a tuple.

    Args:
        rank: adapter rank, an integer >= 1.
        alpha: None or a number > 0.
        targets: `"auto"` or layer names / path regexes.
        prefix: prefix of the argument names in messages (`"lora_"` for the
            recipe options).

    Returns:
        The targets as a tuple of strings.

    Example:
    >>> check_options(0, prefix="lora_")
    Traceback (most recent call last):
    ...
    ValueError: `lora_rank` must be an integer >= 1. Received: lora_rank=0
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"`{prefix}rank` must be an integer >= 1. Received: {prefix}rank={rank!r}")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
    ):
        raise ValueError(
            f"`{prefix}alpha` must be a number > 0 or None. Received: {prefix}alpha={alpha!r}"
        )
    return _targets(targets, f"{prefix}targets")


def _targets(targets, name="targets") -> tuple[str, ...]:
    if targets is None or targets == AUTO:
        return (AUTO,)
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"`{name}` must be 'auto' or a non-empty list of layer names or path regexes. "
            f"Received: {name}={targets!r}"
        )
    for target in targets:
        try:
            re.compile(target)
        except re.error as error:
            raise ValueError(f"Bad LoRA target pattern {target!r}: {error}") from None
    return targets


def _matches(path: str, layer, targets) -> bool:
    name = layer.name
    return any(name == t or re.fullmatch(t, path) for t in targets)


def _auto_targets(layers) -> tuple[str, ...]:
    """Attention query/value where the backbone has attention, else every kernel layer."""
    if any(_leaf(layer) and layer.name in ATTENTION_TARGETS for _, layer in layers):
        return ATTENTION_TARGETS
    return (".*",)


def _kernel_layer(layer) -> bool:
    """A leaf layer with a convolution or dense kernel (LoRA-able or not)."""
    return _leaf(layer) and any(
        v.path.rsplit("/", 1)[-1] in ("kernel", "depthwise_kernel", "pointwise_kernel")
        for v in layer.weights
    )


def _report(model, rank, alpha, targets, layers, skipped) -> LoraReport:
    adapters = [getattr(layer, n) for layer in layers.values() for n in ADAPTER_NAMES]
    return LoraReport(
        rank=int(rank),
        alpha=float(alpha),
        targets=targets,
        layers=tuple(layers),
        skipped=tuple(skipped),
        adapter_params=parameter_count(adapters),
        trainable_params=parameter_count(model.trainable_weights),
        total_params=parameter_count(model.weights),
    )


def enable(
    model: keras.Model,
    rank: int = 8,
    alpha: float | None = None,
    targets: str | Sequence[str] = AUTO,
) -> LoraReport:
    """Adds LoRA adapters to a model's backbone and freezes everything else in it.

    Afterwards only the adapters and the layers outside the backbone (the
    head) train; BatchNorm layers stay in inference mode. Call it once, on a
    built model, before `compile` (`fine_tune(recipe="lora")` does).

    Args:
        model: a model with a `"backbone"` layer (from `build_image_classifier`
            or `build_text_classifier`), or a bare backbone.
        rank: adapter rank r >= 1.
        alpha: scale numerator (the update is `alpha / rank * A @ B`); None
            means `rank` (scale 1), Keras's default.
        targets: `"auto"` (attention query and value projections of a
            transformer; every convolution/dense kernel of a CNN), or layer
            names / regexes matched in full against layer paths such as
            `"backbone/transformer_layer_0/self_attention_layer/query"`.

    Returns:
        A `LoraReport` (print it for the trainable fraction).

    Raises:
        ValueError: bad rank or alpha, targets that match no layer that can
            take adapters, or a model that already has adapters.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_text_classifier("minilm", 2, weights=None, num_layers=1,
    ...                                  sequence_length=8)
    >>> report = kt.lora.enable(model, rank=4)
    >>> [path.rsplit("/", 1)[-1] for path in report.layers]
    ['query', 'value']
    """
    targets = check_options(rank, alpha, targets)
    if lora_layers(model):
        raise ValueError(
            "This model already has LoRA adapters; enable them once (merge first with "
            "`kt.lora.merge` to start again)."
        )
    backbone = get_backbone(model)
    prefix = "" if backbone is model else f"{backbone.name}/"
    layers = list(_named_layers(backbone, prefix))
    patterns = _auto_targets(layers) if targets == (AUTO,) else targets
    chosen, skipped = {}, []
    for path, layer in layers:
        if not _leaf(layer) or not _matches(path, layer, patterns):
            continue
        if hasattr(layer, "enable_lora"):
            chosen[path] = layer
        elif _kernel_layer(layer):
            skipped.append(f"{path} ({type(layer).__name__}: no enable_lora in Keras)")
    if not chosen:
        names = sorted({layer.name for _, layer in layers if hasattr(layer, "enable_lora")})
        raise ValueError(
            f"LoRA `targets` match no layer of the backbone that can take adapters. "
            f"Received: targets={list(targets)}. Layers that can: {names[:12]}"
            + (" ..." if len(names) > 12 else "")
        )
    for layer in chosen.values():
        if not layer.built:
            raise ValueError(f"Layer {layer.name!r} is not built; build the model first.")
        layer.enable_lora(int(rank), lora_alpha=alpha)
    train_adapters_only(model)
    return _report(model, rank, alpha if alpha is not None else rank, targets, chosen, skipped)


def train_adapters_only(model: keras.Model) -> None:
    """In the backbone, only LoRA adapters train; layers outside it (the head) train.

    Keras's `trainable` setter turns every variable of a layer back on
    (adapted kernels included), so recipes call this after any freezing.

    Args:
        model: a model with LoRA adapters in its backbone.

    Returns:
        None.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> _ = kt.lora.enable(model, rank=2)
    >>> model.get_layer("backbone").trainable = False  # what a freeze does
    >>> kt.lora.train_adapters_only(model)
    >>> sorted({v.path.rsplit("/", 1)[-1] for v in model.get_layer("backbone").trainable_weights})
    ['lora_kernel_a', 'lora_kernel_b']
    """
    backbone = get_backbone(model)
    if backbone is not model:
        for layer in model.layers:
            if layer is not backbone:
                layer.trainable = True
    backbone.trainable = True
    for _, layer in _named_layers(backbone):
        if not _leaf(layer):
            continue
        if getattr(layer, "lora_enabled", False):
            adapters = {id(getattr(layer, name)) for name in ADAPTER_NAMES}
            for variable in layer.weights:
                variable.trainable = id(variable) in adapters
        else:
            layer.trainable = False


def _record(model) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("This model has no LoRA adapters (see `kt.lora.enable`).")
    first = next(iter(layers.values()))
    return {
        "rank": int(first.lora_rank),
        "alpha": float(first.lora_alpha),
        "layers": list(layers),
        "format": 1,
    }


def save_adapters(model: keras.Model, path: str | os.PathLike) -> str:
    """Writes the LoRA adapters (only them) to `path` (`.lora.npz`).

    The file records rank, alpha and the adapted layers' paths, so
    `load_adapters` can put the adapters back on a fresh copy of the base
    model. It is written atomically.

    Args:
        model: a model with LoRA adapters.
        path: the file to write; `ADAPTER_SUFFIX` is added if missing.

    Returns:
        The path written.

    Example:
    >>> import tempfile, keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> _ = kt.lora.enable(model, rank=2)
    >>> path = kt.lora.save_adapters(model, f"{tempfile.mkdtemp()}/adapters")
    >>> path.endswith(".lora.npz")
    True
    """
    record = _record(model)
    path = os.fspath(path)
    if not path.endswith(ADAPTER_SUFFIX):
        path += ADAPTER_SUFFIX
    arrays = {_META_KEY: np.array(json.dumps(record))}
    for layer_path, layer in lora_layers(model).items():
        for name in ADAPTER_NAMES:
            arrays[f"{layer_path}/{name}"] = keras.ops.convert_to_numpy(getattr(layer, name))

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())
    return path


def load_adapters(model: keras.Model, path: str | os.PathLike) -> LoraReport:
    """Puts adapters saved by `save_adapters` on a model built like the original.

    LoRA is enabled on the recorded layers with the recorded rank and alpha,
    then the adapter values are loaded; the model's own weights are the base.

    Args:
        model: the base model (same architecture, without adapters).
        path: a `.lora.npz` file.

    Returns:
        A `LoraReport`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an adapter file, or it does not fit the model.

    Example:
    >>> import tempfile, keras_transfer as kt
    >>> def build():
    ...     return kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                      input_shape=(32, 32, 3), alpha=0.75)
    >>> model = build()
    >>> _ = kt.lora.enable(model, rank=2)
    >>> path = kt.lora.save_adapters(model, f"{tempfile.mkdtemp()}/a")
    >>> kt.lora.load_adapters(build(), path).rank
    2
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA adapter file not found: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path!r} is not a LoRA adapter file ({error}).") from None
    if _META_KEY not in arrays:
        raise ValueError(f"{path!r} is not a LoRA adapter file (no {_META_KEY} record).")
    record = json.loads(str(arrays.pop(_META_KEY)))
    if lora_layers(model):
        raise ValueError("The model already has LoRA adapters; load into the base model.")
    layers = dict(_named_layers(model))
    missing = [p for p in record["layers"] if p not in layers]
    if missing:
        raise ValueError(
            f"The adapters in {path!r} do not fit this model: no layer {missing[0]!r} "
            f"({len(missing)} of {len(record['layers'])} missing)."
        )
    chosen = {p: layers[p] for p in record["layers"]}
    for layer_path, layer in chosen.items():
        layer.enable_lora(record["rank"], lora_alpha=record["alpha"])
        for name in ADAPTER_NAMES:
            variable, value = getattr(layer, name), arrays[f"{layer_path}/{name}"]
            if tuple(variable.shape) != value.shape:
                raise ValueError(
                    f"Adapter {layer_path}/{name} has shape {value.shape}; the model's is "
                    f"{tuple(variable.shape)}."
                )
            variable.assign(value)
    train_adapters_only(model)
    return _report(model, record["rank"], record["alpha"], tuple(record["layers"]), chosen, ())


def _strip_lora_config(value):
    if isinstance(value, dict):
        return {k: _strip_lora_config(v) for k, v in value.items() if k not in _LORA_CONFIG_KEYS}
    if isinstance(value, list):
        return [_strip_lora_config(v) for v in value]
    return value


def merge(model: keras.Model) -> keras.Model:
    """A plain copy of a LoRA model with the adapters merged into the kernels.

    The copy has no adapter variables and no `lora_rank` in any layer config,
    so it saves, reloads and exports like any model (its outputs equal the
    LoRA model's up to float rounding). The LoRA model is left as it is.
    A model without adapters is returned as a plain copy too.

    Args:
        model: a model with (or without) LoRA adapters.

    Returns:
        A new `keras.Model` (a text model keeps its `preprocessor`).

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> _ = kt.lora.enable(model, rank=2)
    >>> plain = kt.lora.merge(model)
    >>> len(plain.weights) < len(model.weights)
    True
    """
    # Keras saves a LoRA layer's merged kernel (and no adapter variables);
    # what it keeps wrongly is `lora_rank` in the config, removed here.
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "lora.keras")
        target = os.path.join(scratch, "merged.keras")
        model.save(source)
        with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
            for item in zin.infolist():
                data = zin.read(item.filename)
                if item.filename == "config.json":
                    data = json.dumps(_strip_lora_config(json.loads(data))).encode()
                zout.writestr(item, data)
        merged = keras.saving.load_model(target, safe_mode=True)
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        object.__setattr__(merged, "preprocessor", preprocessor)
    return merged


def deployable(model: keras.Model) -> keras.Model:
    """`merge(model)` when the model has LoRA adapters, else `model` itself.

    `kt.export` calls it, so a LoRA model ships as the plain merged model.

    Args:
        model: any Keras model.

    Returns:
        A model without adapters.

    Example:
    >>> import keras
    >>> plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> deployable(plain) is plain
    True
    """
    return merge(model) if lora_layers(model) else model
