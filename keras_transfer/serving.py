"""Clients for TensorFlow Serving: predictions from an exported classifier over REST or gRPC.

The SavedModels that keras_transfer exports carry three signatures: `serving_default` (float
pixels in, under `image`), `serving_bytes` (encoded JPEG/PNG/BMP/GIF bytes in, under
`image_bytes`) and, optionally, a classification signature `classify` that reads serialized
`tf.Example` protos. Both clients send numpy images to the float signature and image files or
bytes to the bytes signature, and return a `PredictionResult`.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from keras_transfer.export.signatures import BYTES_INPUT as IMAGE_BYTES_KEY
from keras_transfer.export.signatures import DEFAULT_TOP_K as CLIENT_TOP_K
from keras_transfer.export.signatures import IMAGE_INPUT as IMAGE_KEY
from keras_transfer.export.signatures import SERVING_BYTES as BYTES_SIGNATURE
from keras_transfer.export.signatures import SERVING_DEFAULT as FLOAT_SIGNATURE

if TYPE_CHECKING:
    from tensorflow_serving.apis import classification_pb2, predict_pb2

# The TF Serving classification signature (tensorflow/serving/classify) clients may call.
CLASSIFY_SIGNATURE = "classify"
# tensorflow_model_server's default ports (its --port and --rest_api_port flags).
DEFAULT_GRPC_PORT = 8500
DEFAULT_REST_PORT = 8501
DEFAULT_TIMEOUT = 10.0
_INSTALL_HINT = "pip install tensorflow-serving-api==2.21.0"

ImageInput = np.ndarray | str | os.PathLike | bytes | Sequence[Any]


class ServingError(RuntimeError):
    """A TensorFlow Serving request failed: no connection, timeout, or an error from the server.

    The message names the URL or gRPC target, the model, the signature and the server's own
    error text; for an unknown signature it lists the signatures the server has, when known.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class PredictionResult:
    """Class probabilities for a batch of images, with top-k label names when known.

    Args:
        probabilities: float32 array `[batch, num_classes]`.
        classes: top-k label names per image, best first, or None when the model and the
            client have no labels.
        scores: float32 array `[batch, k]`, the probabilities of `classes`, or None.

    Example:

    >>> result = PredictionResult(np.array([[0.25, 0.75]], "float32"))
    >>> result.top1()
    [(1, 0.75)]
    """

    probabilities: np.ndarray
    classes: list[list[str]] | None = None
    scores: np.ndarray | None = None

    def __post_init__(self):
        if self.probabilities.ndim != 2:
            raise ValueError(
                "`probabilities` must have shape [batch, num_classes]. "
                f"Received: probabilities.shape={self.probabilities.shape}"
            )

    def top1(self) -> list[tuple[str | int, float]]:
        """The best class per image: `(label, score)`, or `(index, probability)` without labels."""
        if self.classes is not None and self.scores is not None:
            return [(row[0], float(s[0])) for row, s in zip(self.classes, self.scores, strict=True)]
        best = self.probabilities.argmax(axis=1)
        return [(int(i), float(p[i])) for i, p in zip(best, self.probabilities, strict=True)]


def build_rest_predict_body(
    inputs: Mapping[str, np.ndarray | list[bytes]], signature_name: str = FLOAT_SIGNATURE
) -> dict[str, Any]:
    """The JSON body of a REST `:predict` request, in row (`instances`) format.

    Args:
        inputs: input tensor name -> batch of values: a numpy array, or a list of `bytes`
            (sent as `{"b64": ...}`, TF Serving's encoding for binary strings).
        signature_name: the signature to run.

    Returns:
        `{"signature_name": ..., "instances": [{name: value, ...}, ...]}`.

    Raises:
        ValueError: when `inputs` is empty or its batch sizes differ.

    Example:

    >>> build_rest_predict_body({"image_bytes": [b"abc"]}, "serving_bytes")["instances"]
    [{'image_bytes': {'b64': 'YWJj'}}]
    """
    columns = {name: _json_values(values) for name, values in _check_inputs(inputs).items()}
    batch = len(next(iter(columns.values())))
    instances = [{name: column[i] for name, column in columns.items()} for i in range(batch)]
    return {"signature_name": signature_name, "instances": instances}


def build_predict_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray | list[bytes]],
    signature_name: str = FLOAT_SIGNATURE,
    version: int | None = None,
) -> predict_pb2.PredictRequest:
    """A gRPC `PredictRequest` (needs `tensorflow-serving-api`).

    Args:
        model_name: the model's name on the server.
        inputs: input tensor name -> a numpy array (sent with its dtype) or a list of `bytes`
            (sent as a `DT_STRING` vector).
        signature_name: the signature to run.
        version: a model version, or None for the latest.

    Returns:
        A `tensorflow_serving.apis.predict_pb2.PredictRequest`.

    Raises:
        ValueError: for an empty model name or inputs, or a version below 1.
        ImportError: when `tensorflow-serving-api` is missing.

    Example:

    >>> request = build_predict_request("flowers", {"image": np.zeros((1, 8, 8, 3), "float32")})
    >>> request.model_spec.signature_name
    'serving_default'
    """
    tf, apis = _serving_apis()
    request = apis.predict_pb2.PredictRequest()
    _fill_model_spec(request.model_spec, model_name, signature_name, version)
    for name, values in _check_inputs(inputs).items():
        if isinstance(values, np.ndarray):
            request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
        else:
            request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string, [len(values)]))
    return request


def build_classify_request(
    model_name: str,
    images: list[bytes],
    signature_name: str = CLASSIFY_SIGNATURE,
    version: int | None = None,
) -> classification_pb2.ClassificationRequest:
    """A gRPC `ClassificationRequest`: one `tf.Example` per image, bytes feature `image_bytes`.

    Args:
        model_name: the model's name on the server.
        images: encoded image files, as `bytes`.
        signature_name: the classification signature to run.
        version: a model version, or None for the latest.

    Returns:
        A `tensorflow_serving.apis.classification_pb2.ClassificationRequest`.

    Raises:
        ValueError: for an empty model name or image list, or a version below 1.
        ImportError: when `tensorflow-serving-api` is missing.

    Example:

    >>> request = build_classify_request("flowers", [b"png bytes"])
    >>> len(request.input.example_list.examples)
    1
    """
    _, apis = _serving_apis()
    request = apis.classification_pb2.ClassificationRequest()
    _fill_model_spec(request.model_spec, model_name, signature_name, version)
    for image in _check_inputs({IMAGE_BYTES_KEY: images})[IMAGE_BYTES_KEY]:
        example = request.input.example_list.examples.add()
        example.features.feature[IMAGE_BYTES_KEY].bytes_list.value.append(image)
    return request


class _Client:
    """Argument checks, input handling and result parsing shared by both clients."""

    def __init__(self, model_name, host, port, version, signature_name, timeout, labels):
        _check_name("model_name", model_name)
        _check_name("host", host)
        _check_name("signature_name", signature_name)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"`port` must be an int in [1, 65535]. Received: port={port!r}")
        _check_version(version)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"`timeout` must be a number of seconds > 0. Received: {timeout=}")
        if labels is not None and (
            isinstance(labels, str) or not labels or not all(isinstance(x, str) for x in labels)
        ):
            raise ValueError(
                f"`labels` must be a non-empty list of str or None. Received: {labels=}"
            )
        self.model_name, self.host, self.port = model_name, host, port
        self.version, self.signature_name, self.timeout = version, signature_name, float(timeout)
        self.labels = None if labels is None else list(labels)

    def __repr__(self):
        return (
            f"{type(self).__name__}(model_name={self.model_name!r}, host={self.host!r}, "
            f"port={self.port}, version={self.version}, signature_name={self.signature_name!r})"
        )

    def _inputs(self, images, signature_name):
        """`(signature, {input name: batch})` for numpy images or files/bytes."""
        batch = _read_images(images)
        if isinstance(batch, np.ndarray):
            return signature_name or self.signature_name, {IMAGE_KEY: batch}
        return signature_name or BYTES_SIGNATURE, {IMAGE_BYTES_KEY: batch}

    def _result(self, outputs: Mapping[str, Any]) -> PredictionResult:
        if "probabilities" not in outputs:
            raise ServingError(
                f"Model {self.model_name!r} answered without a `probabilities` output. "
                f"Received outputs: {sorted(outputs)}"
            )
        probabilities = np.asarray(outputs["probabilities"], "float32")
        if "classes" in outputs:
            classes = [[_text(c) for c in row] for row in np.asarray(outputs["classes"]).tolist()]
            scores = outputs.get("scores")
            scores = None if scores is None else np.asarray(scores, "float32")
            return PredictionResult(probabilities, classes, scores)
        if self.labels is None:
            return PredictionResult(probabilities)
        if len(self.labels) != probabilities.shape[-1]:
            raise ValueError(
                f"`labels` must name each of the model's {probabilities.shape[-1]} classes. "
                f"Received: len(labels)={len(self.labels)}"
            )
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :CLIENT_TOP_K]
        classes = [[self.labels[i] for i in row] for row in top]
        return PredictionResult(probabilities, classes, np.take_along_axis(probabilities, top, 1))

    def _raise(self, where: str, signature: str | None, status: str, text: str, known) -> NoReturn:
        """Raises ServingError; lists the server's signatures when `signature` was not found."""
        message = f"TF Serving {status} from {where} for model {self.model_name!r}"
        if signature is not None:
            message += f" with signature_name={signature!r}"
        message += f": {text}"
        lowered = text.lower()
        if signature is not None and "signature" in lowered and "not found" in lowered:
            try:
                names = known()
            except ServingError:
                names = None
            if names:
                message += f". Signatures on the server: {names}"
                close = difflib.get_close_matches(signature, names, n=1)
                message += f". Did you mean {close[0]!r}?" if close else ""
        raise ServingError(message) from None


class RestClient(_Client):
    """A TensorFlow Serving client over its REST API, using only the standard library.

    Numpy images go to the float signature (`signature_name`, input `image`); image file paths
    and `bytes` go to `serving_bytes` (input `image_bytes`, sent as base64).

    Args:
        model_name: the model's name on the server (`--model_name`).
        host: server host name or address.
        port: the REST port (`--rest_api_port`, 8501 by default).
        version: a model version, or None for the latest.
        signature_name: the signature for numpy images.
        timeout: seconds to wait for each request.
        labels: class names, used to fill `classes`/`scores` when the server returns only
            probabilities.

    Raises:
        ValueError: for an empty name, a port outside [1, 65535], a timeout <= 0 or a
            version < 1.

    Example:

    >>> client = RestClient("flowers", port=8501, labels=["daisy", "rose"])
    >>> client.url(":predict")
    'http://localhost:8501/v1/models/flowers:predict'
    """

    def __init__(
        self,
        model_name: str,
        host: str = "localhost",
        port: int = DEFAULT_REST_PORT,
        version: int | None = None,
        signature_name: str = FLOAT_SIGNATURE,
        timeout: float = DEFAULT_TIMEOUT,
        labels: Sequence[str] | None = None,
    ):
        super().__init__(model_name, host, port, version, signature_name, timeout, labels)

    def url(self, suffix: str = "") -> str:
        """The model's URL, `http://host:port/v1/models/<name>[/versions/<v>]<suffix>`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = f"/v1/models/{urllib.parse.quote(self.model_name, safe='')}"
        if self.version is not None:
            path += f"/versions/{self.version}"
        return f"http://{host}:{self.port}{path}{suffix}"

    def predict(self, images: ImageInput, signature_name: str | None = None) -> PredictionResult:
        """Class probabilities for images.

        Args:
            images: a float array `[batch, h, w, 3]` or `[h, w, 3]` of pixels in 0..255, or
                image file paths and/or encoded `bytes` (one or a list).
            signature_name: overrides the signature (default: the client's for arrays,
                `serving_bytes` for files and bytes).

        Returns:
            A `PredictionResult`.

        Raises:
            ServingError: when the server cannot be reached, times out or answers an error.
            FileNotFoundError: for a missing image file.
            ValueError: for an array that is not `[batch, h, w, 3]`.
        """
        signature, inputs = self._inputs(images, signature_name)
        body = self._call(":predict", build_rest_predict_body(inputs, signature), signature)
        if "predictions" in body:
            rows = body["predictions"]
            if rows and isinstance(rows[0], dict):
                return self._result({name: [row[name] for row in rows] for name in rows[0]})
            return self._result({"probabilities": rows})
        if "outputs" in body:
            outputs = body["outputs"]
            return self._result(
                outputs if isinstance(outputs, dict) else {"probabilities": outputs}
            )
        raise ServingError(f"No `predictions` or `outputs` in the answer from {self.url()}")

    def classify(
        self, files_or_bytes: ImageInput, signature_name: str = CLASSIFY_SIGNATURE
    ) -> list[list[tuple[str, float]]]:
        """Runs the classification signature on image files or encoded bytes.

        Args:
            files_or_bytes: image file paths and/or encoded `bytes` (one or a list).
            signature_name: the classification signature.

        Returns:
            Per image, the `(label, score)` pairs the server returns.

        Raises:
            ServingError: as for `predict`.
        """
        images = _read_files(files_or_bytes)
        examples = [{IMAGE_BYTES_KEY: {"b64": _b64(image)}} for image in images]
        body = {"signature_name": signature_name, "examples": examples}
        result = self._call(":classify", body, signature_name).get("result", [])
        return [[(str(label), float(score)) for label, score in row] for row in result]

    def metadata(self) -> dict[str, Any]:
        """The model's metadata (its signature definitions), as TF Serving returns it."""
        return self._call("/metadata")

    def signatures(self) -> list[str]:
        """The names of the model's signatures, sorted."""
        signature_defs = self.metadata().get("metadata", {}).get("signature_def", {})
        return sorted(signature_defs.get("signature_def", {}))

    def status(self) -> dict[str, Any]:
        """The state of the model's versions (`{"model_version_status": [...]}`)."""
        return self._call("")

    def _call(self, suffix: str, body: dict | None = None, signature: str | None = None) -> dict:
        url = self.url(suffix)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url,
            data,
            {"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raw = error.read().decode("utf-8", "replace")
            try:
                text = str(json.loads(raw)["error"])
            except (ValueError, KeyError, TypeError):
                text = raw.strip()[:500] or error.reason
            self._raise(url, signature, f"HTTP {error.code}", text, self.signatures)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                reason = f"no answer within timeout={self.timeout}s"
            raise ServingError(
                f"Cannot reach TF Serving at {url} for model {self.model_name!r}: {reason}"
            ) from error
        except ValueError as error:
            raise ServingError(f"TF Serving at {url} answered invalid JSON: {error}") from None


class GrpcClient(_Client):
    """A TensorFlow Serving client over gRPC (needs `tensorflow-serving-api`).

    Same inputs and results as `RestClient`; tensors travel as `TensorProto`s, so float images
    are not converted to JSON. The channel opens on first use; `close()` or a `with` block
    closes it.

    Args:
        model_name: the model's name on the server (`--model_name`).
        host: server host name or address.
        port: the gRPC port (`--port`, 8500 by default).
        version: a model version, or None for the latest.
        signature_name: the signature for numpy images.
        timeout: deadline in seconds for each call.
        labels: class names, used to fill `classes`/`scores` when the server returns only
            probabilities.

    Raises:
        ValueError: as for `RestClient`.

    Example:

    >>> with GrpcClient("flowers", port=8500, timeout=5.0) as client:
    ...     client.target
    'localhost:8500'
    """

    def __init__(
        self,
        model_name: str,
        host: str = "localhost",
        port: int = DEFAULT_GRPC_PORT,
        version: int | None = None,
        signature_name: str = FLOAT_SIGNATURE,
        timeout: float = DEFAULT_TIMEOUT,
        labels: Sequence[str] | None = None,
    ):
        super().__init__(model_name, host, port, version, signature_name, timeout, labels)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.target = f"{host}:{self.port}"
        self._channel = None
        self._stub = None

    def predict(self, images: ImageInput, signature_name: str | None = None) -> PredictionResult:
        """Class probabilities for images; arguments, result and errors as `RestClient.predict`."""
        tf, _ = _serving_apis()
        signature, inputs = self._inputs(images, signature_name)
        request = build_predict_request(self.model_name, inputs, signature, self.version)
        response = self._call("Predict", request, signature)
        return self._result({name: tf.make_ndarray(t) for name, t in response.outputs.items()})

    def classify(
        self, files_or_bytes: ImageInput, signature_name: str = CLASSIFY_SIGNATURE
    ) -> list[list[tuple[str, float]]]:
        """Runs the classification signature; arguments and result as `RestClient.classify`."""
        images = _read_files(files_or_bytes)
        request = build_classify_request(self.model_name, images, signature_name, self.version)
        response = self._call("Classify", request, signature_name)
        return [
            [(c.label, float(c.score)) for c in result.classes]
            for result in response.result.classifications
        ]

    def signatures(self) -> list[str]:
        """The names of the model's signatures, sorted (from `GetModelMetadata`)."""
        _, apis = _serving_apis()
        request = apis.get_model_metadata_pb2.GetModelMetadataRequest()
        _fill_model_spec(request.model_spec, self.model_name, "", self.version)
        request.metadata_field.append("signature_def")
        response = self._call("GetModelMetadata", request, None)
        signature_map = apis.get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return sorted(signature_map.signature_def)

    def close(self) -> None:
        """Closes the channel; a later call opens a new one."""
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, request, signature: str | None):
        import grpc

        if self._stub is None:
            _, apis = _serving_apis()
            self._channel = grpc.insecure_channel(self.target)
            self._stub = apis.prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as error:
            where = f"{self.target} ({method})"
            self._raise(where, signature, error.code().name, error.details(), self.signatures)


def _serving_apis():
    """`(tensorflow, apis)`; apis holds the TF Serving proto and stub modules."""
    try:
        import grpc  # noqa: F401
        import tensorflow as tf
        from tensorflow_serving import apis
        from tensorflow_serving.apis import (  # noqa: F401
            classification_pb2,
            get_model_metadata_pb2,
            predict_pb2,
            prediction_service_pb2_grpc,
        )
    except ImportError as error:
        raise ImportError(
            f"The gRPC client needs grpcio and tensorflow-serving-api ({error}). "
            f"Install them with: {_INSTALL_HINT}"
        ) from error
    return tf, apis


def _fill_model_spec(spec, model_name, signature_name, version) -> None:
    _check_name("model_name", model_name)
    _check_version(version)
    spec.name = model_name
    spec.signature_name = signature_name
    if version is not None:
        spec.version.value = version


def _check_name(arg: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{arg}` must be a non-empty string. Received: {arg}={value!r}")


def _check_version(version) -> None:
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(f"`version` must be an int >= 1 or None. Received: version={version!r}")


def _check_inputs(inputs):
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(f"`inputs` must be a non-empty dict of name -> batch. Received: {inputs=}")
    inputs = {
        name: values if isinstance(values, np.ndarray) else [bytes(v) for v in values]
        for name, values in inputs.items()
    }
    sizes = {name: len(values) for name, values in inputs.items()}
    if 0 in sizes.values() or len(set(sizes.values())) > 1:
        raise ValueError(f"`inputs` must share one batch size >= 1. Received sizes: {sizes}")
    return inputs


def _read_images(images) -> np.ndarray | list[bytes]:
    """A float32 `[batch, h, w, 3]` array, or the encoded bytes of files/bytes."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], np.ndarray):
        images = np.stack(images)
    if isinstance(images, (str, bytes, bytearray, os.PathLike, list, tuple)):
        return _read_files(images)
    images = np.asarray(images)  # tf.Tensor and other array-likes
    batch = images[None] if images.ndim == 3 else images
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[0] == 0:
        raise ValueError(
            "`images` must be an array [batch, height, width, 3] or [height, width, 3] of RGB "
            f"pixels. Received: images.shape={images.shape}"
        )
    return batch.astype("float32", copy=False)


def _read_files(files_or_bytes) -> list[bytes]:
    if isinstance(files_or_bytes, (str, bytes, bytearray, os.PathLike)):
        files_or_bytes = [files_or_bytes]
    if not isinstance(files_or_bytes, (list, tuple)) or not files_or_bytes:
        raise ValueError(
            "`images` must be image file paths or bytes (one or a non-empty list). "
            f"Received: {type(files_or_bytes).__name__} {files_or_bytes!r:.100}"
        )
    images = []
    for item in files_or_bytes:
        if isinstance(item, (bytes, bytearray, memoryview)):
            images.append(bytes(item))
        elif isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"Image file not found. Received: {os.fspath(item)!r}")
            with open(item, "rb") as file:
                images.append(file.read())
        else:
            raise TypeError(f"Each image must be a file path or bytes. Received: {item!r:.100}")
    return images


def _json_values(values) -> list:
    if isinstance(values, np.ndarray):
        return values.tolist()
    return [{"b64": _b64(value)} for value in values]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
