"""Sparsity of a Keras model's kernels: which ones pruning acts on, masks, zeros, file sizes.

The measuring half of `kt.techniques.pruning`: `prunable_kernels` (the
trainable Dense, Conv and DepthwiseConv kernels, nested models included),
`magnitude_mask` (zero the smallest weights), `layer_sparsity` (the zeros in
each kernel) and `pruning_report`: sparsity per kernel and the size of the
`.keras` and LiteRT files, raw and gzip-compressed, against an unpruned
model. Both files store weights uncompressed, so pruning does not change
their raw size; zeros compress, so their gzip size falls (what a download or
an app bundle pays).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import tempfile

import keras
import numpy as np

from keras_transfer.training import check_number

# The layers whose kernels are pruned, and the names of those kernels.
PRUNABLE_LAYERS = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
)
KERNEL_NAMES = ("kernel",)


def model_layers(model: keras.Model, prefix: str = ""):
    """Every layer inside `model`, nested models included, with its path of layer names.

    Paths join the names of the layers from `model` down (`"backbone/fc"`),
    so they stay the same in a copy or a reloaded model (variables' own
    `path` keeps the names their model had when they were made).

    Args:
        model: a model (or a layer: none inside).
        prefix: put before every path.

    Yields:
        `(path, layer)`, depth first.

    Example:
    >>> inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="fc")], name="in")
    >>> outer = keras.Sequential([keras.Input((2,)), inner], name="out")
    >>> [path for path, _ in model_layers(outer)]
    ['in', 'in/fc']
    """
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        yield path, layer
        yield from model_layers(layer, f"{path}/")


def _kernels(model, trainable_only):
    kernels = {}
    for path, layer in model_layers(model):
        if isinstance(layer, PRUNABLE_LAYERS) and (layer.trainable or not trainable_only):
            for variable in layer.trainable_weights if trainable_only else layer.weights:
                if variable.name in KERNEL_NAMES:
                    kernels[f"{path}/{variable.name}"] = variable
    return kernels


def prunable_kernels(model: keras.Model) -> dict[str, keras.Variable]:
    """The kernels pruning acts on: trainable kernels of Dense, Conv and DepthwiseConv layers.

    Nested models (the backbone) are searched too. LoRA-enabled layers are
    skipped (their base kernel is frozen).

    Args:
        model: a Keras model.

    Returns:
        `{layer path/kernel name: variable}` (see `model_layers`), in layer order.

    Example:
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
    >>> list(prunable_kernels(model))
    ['fc/kernel']
    """
    return _kernels(model, trainable_only=True)


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A 0/1 mask that zeroes the `round(sparsity * size)` smallest-magnitude weights.

    Args:
        weights: an array.
        sparsity: the fraction to zero, in [0, 1).

    Returns:
        A float32 array of `weights`' shape (ties broken by position).

    Example:
    >>> magnitude_mask(np.array([0.3, -0.1, 0.2, -0.4]), 0.5).tolist()
    [1.0, 0.0, 0.0, 1.0]
    """
    check_number("sparsity", sparsity, 0, 1)
    flat = np.abs(np.asarray(weights)).reshape(-1)
    count = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, "float32")
    if count:
        mask[np.argpartition(flat, count - 1, kind="introselect")[:count]] = 0.0
    return mask.reshape(np.shape(weights))


def layer_sparsity(model: keras.Model) -> dict[str, float]:
    """The fraction of exact zeros in each Dense / Conv / DepthwiseConv kernel.

    Frozen kernels are included (unlike `prunable_kernels`).

    Args:
        model: a Keras model.

    Returns:
        `{layer path/kernel name: fraction of zeros}` (see `model_layers`).

    Example:
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
    >>> layer_sparsity(model)
    {'fc/kernel': 0.0}
    """
    return {
        path: float(np.mean(keras.ops.convert_to_numpy(variable) == 0))
        for path, variable in _kernels(model, trainable_only=False).items()
    }


@dataclasses.dataclass(frozen=True)
class FileSizes:
    """The sizes of a model's files, raw and gzip-compressed (bytes).

    Args:
        keras_bytes: the `.keras` file (weights stored uncompressed).
        keras_gzip_bytes: that file through gzip (level 9).
        tflite_bytes: the float LiteRT file (`kt.export.tflite`), or None.
        tflite_gzip_bytes: that file through gzip, or None.
    """

    keras_bytes: int
    keras_gzip_bytes: int
    tflite_bytes: int | None = None
    tflite_gzip_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class PruningReport:
    """What `pruning_report` measured.

    Args:
        layers: `{kernel path: fraction of exact zeros}` (`layer_sparsity`).
        sparsity: zeros over all those kernels' weights.
        sizes: the pruned model's `FileSizes`.
        baseline: the unpruned model's `FileSizes`, or None.
    """

    layers: dict[str, float]
    sparsity: float
    sizes: FileSizes
    baseline: FileSizes | None = None

    def reduction(self, field: str = "keras_gzip_bytes") -> float | None:
        """`1 - pruned / baseline` for a `FileSizes` field (None without a baseline).

        Args:
            field: a `FileSizes` field name.

        Returns:
            The fraction saved, or None.
        """
        if self.baseline is None or getattr(self.baseline, field) is None:
            return None
        return 1.0 - getattr(self.sizes, field) / getattr(self.baseline, field)

    def format(self) -> str:
        """The report as a text table: sparsity per kernel, then file sizes."""
        width = max([len(path) for path in self.layers] + [6])
        lines = [f"{'kernel':<{width}}  sparsity"]
        lines += [f"{path:<{width}}  {value:8.3f}" for path, value in self.layers.items()]
        lines.append(f"{'all':<{width}}  {self.sparsity:8.3f}")
        lines.append("")
        lines.append(f"{'file':<18}{'pruned':>12}{'baseline':>12}{'saved':>8}")
        for field in dataclasses.fields(FileSizes):
            value = getattr(self.sizes, field.name)
            if value is None:
                continue
            base = getattr(self.baseline, field.name) if self.baseline else None
            saved = self.reduction(field.name)
            base = "-" if base is None else format(base, ",")
            saved = "-" if saved is None else format(saved, ".1%")
            lines.append(f"{field.name.removesuffix('_bytes'):<18}{value:>12,}{base:>12}{saved:>8}")
        return "\n".join(lines)


def _file_sizes(model, folder, tflite) -> FileSizes:
    # What `strip_pruning` returns: the weights alone, no optimizer state.
    plain = type(model).from_config(model.get_config())
    plain.set_weights(model.get_weights())
    path = os.path.join(folder, "model.keras")
    plain.save(path)
    with open(path, "rb") as file:
        data = file.read()
    sizes = {"keras_bytes": len(data), "keras_gzip_bytes": len(gzip.compress(data, 9, mtime=0))}
    if tflite:
        # Imported here: `kt.export` imports `kt.techniques` (for LoRA) as it loads.
        from keras_transfer.export import tflite as export_tflite

        path = os.path.join(folder, "model.tflite")
        export_tflite(plain, path, verbose=False)
        with open(path, "rb") as file:
            data = file.read()
        sizes["tflite_bytes"] = len(data)
        sizes["tflite_gzip_bytes"] = len(gzip.compress(data, 9, mtime=0))
    return FileSizes(**sizes)


def pruning_report(
    model: keras.Model, baseline: keras.Model | None = None, *, tflite: bool = True
) -> PruningReport:
    """Sparsity per kernel and gzip-compressed file sizes, against an unpruned model.

    The `.keras` file stores weights uncompressed, so its size does not
    change with pruning; through gzip, the zeros compress. The LiteRT file is
    the float one `kt.export.tflite` writes (its weights are raw too).

    Args:
        model: the pruned model.
        baseline: the same model unpruned (e.g. fine-tuned without pruning),
            or None.
        tflite: also convert to LiteRT and measure that file (seconds per
            model; needs a model `kt.export.tflite` takes).

    Returns:
        A `PruningReport` (`report.format()` prints as a table).

    Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, name="fc")])
    >>> dense = keras.models.clone_model(model)
    >>> kernel = model.get_layer("fc").kernel
    >>> _ = kernel.assign(kernel * magnitude_mask(kernel.numpy(), 0.5))
    >>> report = pruning_report(model, dense, tflite=False)
    >>> report.sparsity, report.reduction() > 0.3
    (0.5, True)
    """
    for name, value in (("model", model), ("baseline", baseline)):
        if value is not None and not isinstance(value, keras.Model):
            raise TypeError(f"`{name}` must be a keras.Model. Received: {type(value).__name__}")
    layers = layer_sparsity(model)
    counts = {path: int(np.prod(v.shape)) for path, v in _kernels(model, False).items()}
    total = sum(counts.values())
    sparsity = sum(layers[path] * counts[path] for path in layers) / total if total else 0.0
    with tempfile.TemporaryDirectory() as folder:
        sizes = _file_sizes(model, folder, tflite)
        base = _file_sizes(baseline, folder, tflite) if baseline is not None else None
    return PruningReport(layers, sparsity, sizes, base)
