"""The graph quantisation-aware training trains: the model as the LiteRT int8 converter sees it.

`simulate_int8(model)` rebuilds a functional model's graph (nested
functional models inlined) from the model's own layers and variables, with
what full-integer int8 conversion does simulated: BatchNorm folded into the
convolution before it, per-channel symmetric int8 kernels, and an
`ActivationQuantizer` (per-tensor asymmetric int8) at every tensor the LiteRT
file quantises, ReLU/ReLU6 fused into the op before it as the converter
fuses them; with it the same graph in float, whose tensors at the
quantizers' places are what calibration measures. See
`keras_transfer.techniques.quantization` for what is simulated and for the
training.
"""

from __future__ import annotations

import collections
import dataclasses

import keras
import numpy as np
from keras import ops

BITS = 8
# Softmax / LOGISTIC outputs in int8 LiteRT files: scale 1/256, zero point -128.
FIXED_RANGE = (0.0, 255.0 / 256.0)
_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
_FUSABLE = {"relu", "relu6"}
_ACTIVATIONS = _FUSABLE | {
    "linear",
    "softmax",
    "sigmoid",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "silu",
    "swish",
    "tanh",
}
# Layers whose output keeps its input's int8 quantisation (no requantisation).
_PASSTHROUGH = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.MaxPooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Identity,
)
# Layers whose output the converter quantises anew.
_QUANTISED = (
    keras.layers.ReLU,
    keras.layers.Add,
    keras.layers.Multiply,
    keras.layers.Subtract,
    keras.layers.Average,
    keras.layers.Concatenate,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.Rescaling,
    keras.layers.Normalization,
    keras.layers.Softmax,
)
_ELEMENTWISE_OPS = {"Add", "Multiply", "Subtract", "Divide", "TrueDivide"}
_PREPROCESSING = {"ImagePreprocessing"}  # keras_transfer's own, elementwise
_FUSING = (*_CONVOLUTIONS, keras.layers.Dense, keras.layers.BatchNormalization, keras.layers.Add)


def _activation_name(op):
    if isinstance(op, keras.layers.Softmax):
        return "softmax"
    function = getattr(op, "activation", None)
    return getattr(function, "__name__", None) if function is not None else None


def _fusable(op):
    """A ReLU / ReLU6 the converter fuses into the op before it."""
    if isinstance(op, keras.layers.ReLU):
        return op.max_value in (None, 6.0) and not op.negative_slope and not op.threshold
    return isinstance(op, keras.layers.Activation) and _activation_name(op) in _FUSABLE


def _is_zero(value):
    return not np.any(np.asarray(value))


def _nested(op):
    """The functional graph of a nested model, or None."""
    if isinstance(op, keras.Sequential):
        return op._functional
    return op if isinstance(op, keras.Model) and hasattr(op, "_nodes_by_depth") else None


def _nodes(graph):
    """The nodes of a functional graph in topological order (inputs excluded)."""
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        yield from (node for node in graph._nodes_by_depth[depth] if not node.is_input)


def _supported(op):
    if isinstance(op, keras.layers.Conv2D):
        return op.groups == 1 and op.data_format == "channels_last" and op.rank == 2
    if isinstance(op, (keras.layers.DepthwiseConv2D, keras.layers.Dense)):
        return getattr(op, "data_format", "channels_last") == "channels_last"
    if isinstance(op, keras.layers.BatchNormalization):
        return op.axis in (-1, len(op.input.shape) - 1)
    if isinstance(op, keras.layers.Activation):
        return _activation_name(op) in _ACTIVATIONS
    if not isinstance(op, keras.layers.Layer):  # a keras op in the graph, e.g. `x + 3`
        return type(op).__name__ in _ELEMENTWISE_OPS
    return isinstance(op, (*_PASSTHROUGH, *_QUANTISED)) or type(op).__name__ in _PREPROCESSING


class _Plan:
    """What the converter will do with each node: folds, fused activations; unsupported layers."""

    def __init__(self, model):
        self.folded = {}  # id(conv node) -> BatchNormalization folded into it
        self.fold_targets = set()  # id(BN node) folded into the conv before it
        self.fused = set()  # id(node) whose ReLU after it is fused
        self.unsupported = []
        self.layers = []
        self._read(model)

    def _read(self, graph):
        consumers = collections.defaultdict(list)
        for node in _nodes(graph):
            for tensor in node.input_tensors:
                consumers[id(tensor)].append(node)
        outputs = {id(t) for t in graph.outputs}
        for node in _nodes(graph):
            op = node.operation
            if _nested(op) is not None:
                self._read(_nested(op))
                continue
            if not _supported(op):
                self.unsupported.append(f"{op.name} ({type(op).__name__})")
            if isinstance(
                op, (*_CONVOLUTIONS, keras.layers.Dense, keras.layers.BatchNormalization)
            ):
                self.layers.append(op)
            out = node.outputs[0]
            users = consumers[id(out)] if id(out) not in outputs else []
            sole = users[0].operation if len(users) == 1 else None
            if (
                isinstance(op, _CONVOLUTIONS)
                and _activation_name(op) == "linear"
                and isinstance(sole, keras.layers.BatchNormalization)
            ):
                self.folded[id(node)] = sole
                self.fold_targets.add(id(users[0]))
            if sole is not None and _fusable(sole) and isinstance(op, _FUSING):
                self.fused.add(id(node))


def _fake_quant_weights(kernel, channels):
    """Per-channel symmetric int8 of a kernel whose last axes make `channels` outputs."""
    shape = kernel.shape
    flat = ops.reshape(kernel, (-1, channels))
    bound = ops.maximum(ops.stop_gradient(ops.max(ops.abs(flat), axis=0)), 1e-8)
    quantised = keras.quantizers.fake_quant_with_min_max_vars(
        flat, -bound, bound, num_bits=BITS, narrow_range=True, axis=-1
    )
    return ops.reshape(quantised, shape)


class _QuantisedLayer(keras.layers.Layer):
    """Training only (never saved): a Conv/Depthwise/Dense/BatchNorm computed from its own
    variables, a following BatchNorm folded in, the kernel fake-quantised (`quantize`)."""

    def __init__(self, layer, bn=None, quantize=True, **kwargs):
        super().__init__(**kwargs)
        self.layer, self.bn, self.quantize = layer, bn, quantize

    @staticmethod
    def _fold(bn, bias):
        """`(per-channel scale, bias)` of BatchNorm `bn` applied after a bias."""
        scale = ops.rsqrt(bn.moving_variance + bn.epsilon)
        if bn.scale:
            scale = scale * bn.gamma
        return scale, (bias - bn.moving_mean) * scale + (bn.beta if bn.center else 0.0)

    def call(self, x):
        layer = self.layer
        if isinstance(layer, keras.layers.BatchNormalization):  # standalone: an affine map
            scale, bias = self._fold(layer, 0.0)
            return x * scale + bias
        kernel = layer.kernel
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        # A depthwise kernel is [h, w, in, multiplier]: output channel in * multiplier.
        channel_shape = tuple(kernel.shape[2:]) if depthwise else (kernel.shape[-1],)
        channels = int(np.prod(channel_shape))
        bias = layer.bias if layer.use_bias else ops.zeros((channels,))
        if self.bn is not None:
            scale, bias = self._fold(self.bn, bias)
            kernel = kernel * ops.reshape(scale, channel_shape)
        if self.quantize:
            kernel = _fake_quant_weights(kernel, channels)
        if isinstance(layer, keras.layers.Dense):
            return ops.matmul(x, kernel) + bias
        convolve = ops.depthwise_conv if depthwise else ops.conv
        y = convolve(
            x, kernel, layer.strides, layer.padding, layer.data_format, layer.dilation_rate
        )
        return y + bias


@keras.saving.register_keras_serializable(package="keras_transfer")
class ActivationQuantizer(keras.layers.Layer):
    """Fake-quantises a tensor to per-tensor asymmetric int8 within `[minimum, maximum]`.

    The range is set from outside (`set_range`: QAT's calibration) or fixed
    (`fixed_range`, e.g. `(0, 255/256)` for probabilities). Gradients pass
    straight through inside the range.

    Args:
        fixed_range: None, or `(min, max)` never recalibrated.
        **kwargs: standard layer arguments.

    Example:
    >>> import numpy as np
    >>> layer = ActivationQuantizer(fixed_range=(0.0, 1.0))
    >>> [round(float(v) * 255, 3) for v in layer(np.array([0.2, 0.3012, 1.5]))]  # 1/255 grid
    [51.0, 77.0, 255.0]
    """

    def __init__(self, fixed_range: tuple[float, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.fixed_range = None if fixed_range is None else tuple(float(v) for v in fixed_range)
        low, high = self.fixed_range or (0.0, 0.0)
        self.minimum = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(low), trainable=False, name="minimum"
        )
        self.maximum = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(high), trainable=False, name="maximum"
        )

    def set_range(self, low: float, high: float) -> None:
        """Sets the range (ignored for a fixed one)."""
        if self.fixed_range is None:
            self.minimum.assign(min(float(low), 0.0))
            self.maximum.assign(max(float(high), 0.0))

    def call(self, x):
        return keras.quantizers.fake_quant_with_min_max_vars(
            x, self.minimum, self.maximum, num_bits=BITS
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "fixed_range": self.fixed_range}


class _Builder:
    """Rebuilds a model's graph, nested models inlined, as the converter will quantise it.

    With `quantize=False` the same graph in float (the folds computed, no
    fake quantisation): `points` then holds the float tensor at each place
    where the quantised graph has an `ActivationQuantizer`, in the same order.
    """

    def __init__(self, plan, quantize, outputs):
        self.plan, self.quantize, self.points = plan, quantize, []
        self.outputs = {id(t) for t in outputs}  # the model's own outputs

    def point(self, x, name, fixed_range=None):
        if not self.quantize:
            self.points.append(x)
            return x
        quantizer = ActivationQuantizer(fixed_range, name=f"quant_{len(self.points)}_{name}")
        self.points.append(quantizer)
        return quantizer(x)

    def graph(self, graph, inputs):
        values = {id(x): y for x, y in zip(graph.inputs, keras.tree.flatten(inputs), strict=True)}
        for node in _nodes(graph):
            args, kwargs = node.arguments.fill_in(values)
            op = node.operation
            if _nested(op) is not None:
                outputs = self.graph(_nested(op), args[0])
            else:
                outputs = self.node(node, op, args, kwargs)
            for x, y in zip(node.outputs, keras.tree.flatten(outputs), strict=True):
                values[id(x)] = y
        return [values[id(x)] for x in graph.outputs]

    def node(self, node, op, args, kwargs):
        name = op.name if isinstance(op, keras.layers.Layer) else type(op).__name__.lower()
        activation = _activation_name(op)
        if id(node) in self.plan.fold_targets:  # a BatchNorm already in the conv before it
            y = args[0]
        elif isinstance(op, (*_CONVOLUTIONS, keras.layers.Dense, keras.layers.BatchNormalization)):
            bn = self.plan.folded.get(id(node))
            y = _QuantisedLayer(op, bn, self.quantize, name=f"qat_{name}")(args[0])
            if activation not in (None, "linear"):  # the layer's own activation
                if activation not in _FUSABLE:
                    y = self.point(y, f"{name}_preactivation")
                y = keras.layers.Activation(op.activation, name=f"qat_{name}_activation")(y)
        elif isinstance(op, keras.layers.Rescaling) and not _is_zero(op.offset):
            # The converter makes a MUL and an ADD, each quantised.
            y = self.point(ops.multiply(args[0], op.scale), f"{name}_scale")
            y = ops.add(y, op.offset)
        else:
            y = op(*args, **kwargs)
        if isinstance(op, _PASSTHROUGH) or (
            isinstance(op, keras.layers.Activation) and activation == "linear"
        ):
            return y
        if id(node) in self.plan.fused or id(node) in self.plan.folded:
            return y  # quantised after the ReLU / BatchNorm the converter fuses into it
        if id(node.outputs[0]) in self.outputs and activation in ("softmax", "sigmoid"):
            # The probabilities' 1/256 grid: left out of training (a loss on
            # rounded probabilities, zeros included, is ill-behaved).
            return y
        fixed = FIXED_RANGE if activation in ("softmax", "sigmoid") else None
        return self.point(y, name, fixed)


def check_quantizable(model: keras.Model) -> list[keras.layers.Layer]:
    """Checks that QAT can simulate every layer of `model`; returns the layers with weights.

    Args:
        model: a functional (or Sequential) model with one input.

    Returns:
        Its Conv2D, DepthwiseConv2D, Dense and BatchNormalization layers
        (nested models' included), the layers QAT trains.

    Raises:
        ValueError: another kind of model, or layers QAT cannot simulate,
            each named with its class.

    Example:
    >>> import keras
    >>> inputs = keras.Input((4, 4, 3))
    >>> model = keras.Model(inputs, keras.layers.LayerNormalization(name="norm")(inputs))
    >>> check_quantizable(model)
    Traceback (most recent call last):
    ...
    ValueError: Quantisation-aware training simulates Conv2D, DepthwiseConv2D, Dense, BatchNormalization, ReLU and elementwise, pooling and activation layers only. Received: a model with ['norm (LayerNormalization)']
    """
    if _nested(model) is None or len(model.inputs) != 1:
        raise ValueError(
            "Quantisation-aware training takes a functional or Sequential model with one "
            f"input. Received: {type(model).__name__} with inputs "
            f"{getattr(model, 'inputs', None)}"
        )
    plan = _Plan(_nested(model))
    if plan.unsupported:
        raise ValueError(
            "Quantisation-aware training simulates Conv2D, DepthwiseConv2D, Dense, "
            "BatchNormalization, ReLU and elementwise, pooling and activation layers only. "
            f"Received: a model with {plan.unsupported}"
        )
    return plan.layers


@dataclasses.dataclass
class Int8Simulation:
    """A model's graph with its int8 conversion simulated (see `simulate_int8`).

    Attributes:
        model: the fake-quantised graph, a plain functional model sharing the
            original model's variables (what QAT trains).
        quantizers: its `ActivationQuantizer` layers, in graph order.
        probe: the same graph in float, whose outputs are the tensors the
            quantizers read: what `calibrate` measures.
        float_model: the same graph in float (BatchNorm folded): the
            original model's function.
    """

    model: keras.Model
    quantizers: list[ActivationQuantizer]
    probe: keras.Model
    float_model: keras.Model

    def calibrate(self, images: np.ndarray, batch_size: int = 32) -> None:
        """Sets every quantizer's range to its float tensor's min/max on `images`.

        This is the converter's calibration (min/max over the representative
        images), measured on the float graph.

        Args:
            images: calibration images `[n, h, w, 3]`.
            batch_size: images per forward pass.
        """
        low = np.full(len(self.quantizers), np.inf)
        high = np.full(len(self.quantizers), -np.inf)
        for start in range(0, len(images), batch_size):
            values = self.probe(images[start : start + batch_size], training=False)
            for i, value in enumerate(keras.tree.flatten(values)):
                value = ops.convert_to_numpy(value)
                low[i], high[i] = min(low[i], value.min()), max(high[i], value.max())
        for quantizer, a, b in zip(self.quantizers, low, high, strict=True):
            quantizer.set_range(a, b)


def simulate_int8(model: keras.Model) -> Int8Simulation:
    """The graph QAT trains: `model` as full-integer int8 conversion will compute it.

    Args:
        model: a functional image model (nested functional models inlined).

    Returns:
        An `Int8Simulation`; call its `calibrate(images)` before using its
        model (the quantizers' ranges start empty).

    Raises:
        ValueError: see `check_quantizable`.

    Example:
    >>> import keras, numpy as np
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    >>> x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    >>> model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    >>> simulation = simulate_int8(model)
    >>> len(simulation.quantizers)  # the input, the conv+BN+ReLU, the pooling
    3
    >>> simulation.calibrate(np.random.rand(4, 8, 8, 3).astype("float32"))
    >>> simulation.model.predict(np.zeros((1, 8, 8, 3)), verbose=0).shape
    (1, 4)
    """
    check_quantizable(model)
    plan = _Plan(_nested(model))
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    graphs = []
    for quantize in (True, False):
        builder = _Builder(plan, quantize, model.outputs)
        outputs = builder.graph(_nested(model), builder.point(inputs, "input"))
        graphs.append((outputs[0] if len(outputs) == 1 else outputs, builder.points))
    (outputs, quantizers), (float_outputs, points) = graphs
    return Int8Simulation(
        keras.Model(inputs, outputs, name=f"int8_{model.name}"),
        quantizers,
        keras.Model(inputs, points, name=f"int8_probe_{model.name}"),
        keras.Model(inputs, float_outputs, name=f"folded_{model.name}"),
    )
