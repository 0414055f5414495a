"""Tests for keras_transfer.serving against fake TF Serving servers (REST and gRPC), in process."""

import base64
import http.server
import io
import json
import re
import socket
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from keras_transfer.serving import (
    GrpcClient,
    PredictionResult,
    RestClient,
    ServingError,
    build_classify_request,
    build_predict_request,
    build_rest_predict_body,
)

MODEL = "flowers"
LATEST = 2
LABELS = ["daisy", "rose", "tulip"]
TOP_K = 2
# Predict signatures of the fake model and their input; `classify` is the classification one.
INPUTS = {"serving_default": "image", "serving_bytes": "image_bytes"}
SIGNATURES = sorted([*INPUTS, "classify"])
# REST-only variants of the model: answers with one output, answers in columns, answers late.
PLAIN, COLUMNAR, SLOW = "plain", "columnar", "slow"
SLOW_SECONDS = 1.5
SIZE = 8


def fake_probabilities(pixels):
    """The fake model: softmax of the per-channel means / 64, so 3 classes."""
    logits = np.asarray(pixels, "float64").mean(axis=(1, 2)) / 64
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype("float32")


def fake_top_k(probabilities):
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_K]
    return [[LABELS[i] for i in row] for row in top], np.take_along_axis(probabilities, top, 1)


def decode(data):
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), "float32")


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype("float32")


def png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Fake REST server: TF Serving's documented JSON API ----------------------------------------

PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(:predict|:classify|/metadata)?$")


class FakeRestHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._handle(None)

    def do_POST(self):
        self._handle(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def _handle(self, body):
        self.server.requests.append((self.command, self.path, body))
        match = PATH.match(self.path)
        model, version, verb = match.groups() if match else (None, None, None)
        if model not in (MODEL, PLAIN, COLUMNAR, SLOW) or version not in (None, str(LATEST)):
            spec = f"Specific({model}, {version})" if version else f"Latest({model})"
            return self._send(404, {"error": f"Servable not found for request: {spec}"})
        if model == SLOW:
            time.sleep(SLOW_SECONDS)
        if verb is None:
            state = {"version": str(LATEST), "state": "AVAILABLE"}
            state["status"] = {"error_code": "OK", "error_message": ""}
            return self._send(200, {"model_version_status": [state]})
        if verb == "/metadata":
            signature_defs = {
                name: {"method_name": "tensorflow/serving/predict"} for name in INPUTS
            }
            signature_defs["classify"] = {"method_name": "tensorflow/serving/classify"}
            spec = {"name": model, "signature_name": "", "version": str(LATEST)}
            metadata = {"signature_def": {"signature_def": signature_defs}}
            return self._send(200, {"model_spec": spec, "metadata": metadata})
        signature = body.get("signature_name") or "serving_default"
        if signature not in (["classify"] if verb == ":classify" else INPUTS):
            message = f'Serving signature name: "{signature}" not found in signature def'
            return self._send(400, {"error": message})
        rows = body["examples" if verb == ":classify" else "instances"]
        key = INPUTS.get(signature, "image_bytes")
        if any(set(row) != {key} for row in rows):
            return self._send(400, {"error": f"Missing or unexpected input; expected {key!r}"})
        if key == "image":
            pixels = np.array([row[key] for row in rows], "float32")
        else:
            data = [base64.b64decode(row[key]["b64"], validate=True) for row in rows]
            self.server.received_bytes.extend(data)
            pixels = np.stack([decode(d) for d in data])
        probabilities = fake_probabilities(pixels)
        classes, scores = fake_top_k(probabilities)
        if verb == ":classify":
            result = [
                [[c, float(s)] for c, s in zip(cs, ss, strict=True)]
                for cs, ss in zip(classes, scores, strict=True)
            ]
            return self._send(200, {"result": result})
        if model == PLAIN:
            return self._send(200, {"predictions": probabilities.tolist()})
        outputs = {"probabilities": probabilities.tolist(), "classes": classes}
        outputs["scores"] = scores.tolist()
        if model == COLUMNAR:
            return self._send(200, {"outputs": outputs})
        predictions = [
            {name: column[i] for name, column in outputs.items()} for i in range(len(rows))
        ]
        self._send(200, {"predictions": predictions})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout test)


@pytest.fixture
def rest_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRestHandler)
    server.requests, server.received_bytes = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def rest_client(server, model=MODEL, **kwargs):
    return RestClient(model, host="127.0.0.1", port=server.server_address[1], **kwargs)


# --- REST client --------------------------------------------------------------------------------


def test_rest_predict_numpy_round_trips_values(rest_server):
    images = random_images(3)
    result = rest_client(rest_server).predict(images)
    expected = fake_probabilities(images)
    np.testing.assert_allclose(result.probabilities, expected, rtol=0, atol=1e-7)
    assert result.probabilities.dtype == np.float32
    assert result.classes == fake_top_k(expected)[0]
    np.testing.assert_allclose(result.scores, fake_top_k(expected)[1], rtol=0, atol=1e-7)
    assert result.top1() == [
        (c[0], float(s[0])) for c, s in zip(*fake_top_k(expected), strict=True)
    ]
    method, path, body = rest_server.requests[-1]
    assert (method, path) == ("POST", f"/v1/models/{MODEL}:predict")
    assert body["signature_name"] == "serving_default"
    np.testing.assert_array_equal(np.array([row["image"] for row in body["instances"]]), images)


def test_rest_predict_files_and_bytes_use_b64_bytes_signature(rest_server, tmp_path):
    images = random_images(2, seed=1)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(images[0]))
    raw = png_bytes(images[1])
    result = rest_client(rest_server).predict([str(path), raw])
    assert rest_server.received_bytes == [path.read_bytes(), raw]
    assert rest_server.requests[-1][2]["signature_name"] == "serving_bytes"
    np.testing.assert_allclose(result.probabilities, fake_probabilities(images), atol=1e-7)


def test_rest_predict_single_image_and_single_path(rest_server, tmp_path):
    image = random_images(1, seed=2)[0]
    client = rest_client(rest_server)
    assert client.predict(image).probabilities.shape == (1, len(LABELS))
    path = tmp_path / "one.png"
    path.write_bytes(png_bytes(image))
    np.testing.assert_allclose(
        client.predict(path).probabilities, fake_probabilities(image[None]), atol=1e-7
    )


def test_rest_version_goes_in_the_url(rest_server):
    rest_client(rest_server, version=LATEST).predict(random_images(1))
    assert rest_server.requests[-1][1] == f"/v1/models/{MODEL}/versions/{LATEST}:predict"
    with pytest.raises(ServingError, match=r"HTTP 404.*Specific\(flowers, 7\)"):
        rest_client(rest_server, version=7).predict(random_images(1))


@pytest.mark.parametrize("model", [PLAIN, COLUMNAR])
def test_rest_parses_single_output_and_column_answers(rest_server, model):
    images = random_images(2, seed=3)
    expected = fake_probabilities(images)
    result = rest_client(rest_server, model, labels=LABELS).predict(images)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-7)
    if model == PLAIN:  # filled by the client from `labels`: all 3 classes, best first
        order = np.argsort(-expected, axis=1)
        assert result.classes == [[LABELS[i] for i in row] for row in order]
    else:
        assert result.classes == fake_top_k(expected)[0]
    assert [label for label, _ in result.top1()] == [LABELS[i] for i in expected.argmax(1)]


def test_rest_without_labels_top1_gives_indices(rest_server):
    images = random_images(2, seed=4)
    result = rest_client(rest_server, PLAIN).predict(images)
    assert result.classes is None and result.scores is None
    expected = fake_probabilities(images)
    assert result.top1() == [
        (int(i), float(p[i])) for i, p in zip(expected.argmax(1), expected, strict=True)
    ]
    with pytest.raises(ValueError, match=r"Received: len\(labels\)=2"):
        rest_client(rest_server, PLAIN, labels=["a", "b"]).predict(images)


def test_rest_classify(rest_server, tmp_path):
    images = random_images(2, seed=5)
    data = [png_bytes(image) for image in images]
    results = rest_client(rest_server).classify(data)
    classes, scores = fake_top_k(fake_probabilities(images))
    assert [[label for label, _ in row] for row in results] == classes
    np.testing.assert_allclose([[s for _, s in row] for row in results], scores, atol=1e-7)
    method, path, body = rest_server.requests[-1]
    assert path == f"/v1/models/{MODEL}:classify" and body["signature_name"] == "classify"
    assert rest_server.received_bytes == data


def test_rest_metadata_signatures_and_status(rest_server):
    client = rest_client(rest_server)
    assert client.metadata()["model_spec"]["name"] == MODEL
    assert client.signatures() == SIGNATURES
    assert client.status()["model_version_status"][0]["state"] == "AVAILABLE"
    assert [r[:2] for r in rest_server.requests] == [
        ("GET", f"/v1/models/{MODEL}/metadata"),
        ("GET", f"/v1/models/{MODEL}/metadata"),
        ("GET", f"/v1/models/{MODEL}"),
    ]


def test_rest_unknown_signature_names_it_and_lists_the_servers(rest_server):
    client = rest_client(rest_server, signature_name="serving_defualt")
    with pytest.raises(ServingError) as info:
        client.predict(random_images(1))
    message = str(info.value)
    assert "HTTP 400" in message and "signature_name='serving_defualt'" in message
    assert str(SIGNATURES) in message and "Did you mean 'serving_default'?" in message


def test_rest_unknown_model(rest_server):
    with pytest.raises(ServingError, match=r"HTTP 404.*'tulips'.*Latest\(tulips\)"):
        rest_client(rest_server, "tulips").predict(random_images(1))


def test_rest_connection_refused_names_the_url():
    client = RestClient(MODEL, host="127.0.0.1", port=closed_port(), timeout=2)
    with pytest.raises(ServingError, match=re.escape(client.url(":predict"))):
        client.predict(random_images(1))


def test_rest_timeout(rest_server):
    start = time.monotonic()
    with pytest.raises(ServingError, match=r"timeout=0\.5s"):
        rest_client(rest_server, SLOW, timeout=0.5).status()
    assert time.monotonic() - start < SLOW_SECONDS


@pytest.mark.parametrize("client_class", [RestClient, GrpcClient])
@pytest.mark.parametrize(
    "kwargs, received",
    [
        ({"model_name": ""}, "model_name=''"),
        ({"port": 0}, "port=0"),
        ({"port": 70000}, "port=70000"),
        ({"timeout": 0}, "timeout=0"),
        ({"version": 0}, "version=0"),
        ({"signature_name": ""}, "signature_name=''"),
        ({"labels": "daisy"}, "labels='daisy'"),
    ],
)
def test_bad_arguments(client_class, kwargs, received):
    kwargs = {"model_name": MODEL, **kwargs}
    with pytest.raises(ValueError, match=re.escape(f"Received: {received}")):
        client_class(**kwargs)


def test_bad_images(tmp_path):
    client = RestClient(MODEL, port=closed_port())
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match=re.escape(repr(missing))):
        client.predict([missing])
    with pytest.raises(ValueError, match=re.escape("Received: images.shape=(2, 8, 8, 4)")):
        client.predict(np.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError, match="Received: list"):
        client.predict([])


# --- Request builders ---------------------------------------------------------------------------


def test_build_rest_predict_body():
    images = random_images(2)
    body = build_rest_predict_body({"image": images})
    assert body["signature_name"] == "serving_default"
    np.testing.assert_array_equal([row["image"] for row in body["instances"]], images)
    body = build_rest_predict_body({"image_bytes": [b"\x00\xff", b"png"]}, "serving_bytes")
    assert [base64.b64decode(r["image_bytes"]["b64"]) for r in body["instances"]] == [
        b"\x00\xff",
        b"png",
    ]
    with pytest.raises(ValueError, match="one batch size"):
        build_rest_predict_body({"a": images, "b": [b"x"]})


def test_build_predict_request_float_and_bytes():
    images = random_images(2)
    request = build_predict_request(MODEL, {"image": images}, version=3)
    assert isinstance(request, predict_pb2.PredictRequest)
    spec = request.model_spec
    assert (spec.name, spec.signature_name, spec.version.value) == (MODEL, "serving_default", 3)
    tensor = request.inputs["image"]
    assert tensor.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in tensor.tensor_shape.dim] == [2, SIZE, SIZE, 3]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), images)

    data = [png_bytes(image) for image in images]
    request = build_predict_request(MODEL, {"image_bytes": data}, "serving_bytes")
    assert not request.model_spec.HasField("version")
    tensor = request.inputs["image_bytes"]
    assert tensor.dtype == tf.string.as_datatype_enum
    assert [d.size for d in tensor.tensor_shape.dim] == [2]
    assert list(tensor.string_val) == data
    with pytest.raises(ValueError, match="Received: version=0"):
        build_predict_request(MODEL, {"image": images}, version=0)


def test_build_classify_request():
    data = [b"first image", b"\x89PNG second"]
    request = build_classify_request(MODEL, data, version=1)
    assert isinstance(request, classification_pb2.ClassificationRequest)
    assert request.model_spec.signature_name == "classify"
    assert request.model_spec.version.value == 1
    examples = request.input.example_list.examples
    assert [list(e.features.feature) for e in examples] == [["image_bytes"]] * 2
    assert [e.features.feature["image_bytes"].bytes_list.value[0] for e in examples] == data
    parsed = tf.io.parse_example(
        [e.SerializeToString() for e in examples],
        {"image_bytes": tf.io.FixedLenFeature([], tf.string)},
    )
    assert parsed["image_bytes"].numpy().tolist() == data


def test_missing_serving_api_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ImportError, match=re.escape("pip install tensorflow-serving-api==2.21.0")):
        build_predict_request(MODEL, {"image": random_images(1)})


def test_prediction_result():
    result = PredictionResult(np.array([[0.25, 0.75], [0.5, 0.5]], "float32"))
    assert result.top1() == [(1, 0.75), (0, 0.5)]
    with pytest.raises(ValueError, match=r"Received: probabilities.shape=\(2,\)"):
        PredictionResult(np.array([0.25, 0.75], "float32"))


# --- gRPC client against an in-process PredictionService ----------------------------------------


class FakePredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self):
        self.requests = []

    def _check(self, request, context, signatures):
        self.requests.append(request)
        name = request.model_spec.name
        if name not in (MODEL, SLOW):
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {name}")
        if name == SLOW:
            time.sleep(SLOW_SECONDS)
        signature = request.model_spec.signature_name or "serving_default"
        if signatures is not None and signature not in signatures:
            message = f'Serving signature key "{signature}" not found.'
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        return signature

    def Predict(self, request, context):
        key = INPUTS[self._check(request, context, INPUTS)]
        if list(request.inputs) != [key]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected input {key!r}")
        values = tf.make_ndarray(request.inputs[key])
        pixels = values if key == "image" else np.stack([decode(v) for v in values])
        probabilities = fake_probabilities(pixels)
        classes, scores = fake_top_k(probabilities)
        response = predict_pb2.PredictResponse()
        response.outputs["probabilities"].CopyFrom(tf.make_tensor_proto(probabilities))
        response.outputs["classes"].CopyFrom(tf.make_tensor_proto(classes, tf.string))
        response.outputs["scores"].CopyFrom(tf.make_tensor_proto(scores))
        return response

    def Classify(self, request, context):
        self._check(request, context, ["classify"])
        examples = request.input.example_list.examples
        data = [e.features.feature["image_bytes"].bytes_list.value[0] for e in examples]
        classes, scores = fake_top_k(fake_probabilities(np.stack([decode(d) for d in data])))
        response = classification_pb2.ClassificationResponse()
        for labels, values in zip(classes, scores, strict=True):
            result = response.result.classifications.add()
            for label, score in zip(labels, values, strict=True):
                result.classes.add(label=label, score=score)
        return response

    def GetModelMetadata(self, request, context):
        self._check(request, context, None)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name in SIGNATURES:
            signature_map.signature_def[name].CopyFrom(meta_graph_pb2.SignatureDef())
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.metadata["signature_def"].Pack(signature_map)
        return response


@pytest.fixture(scope="module")
def grpc_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service = FakePredictionService()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, service
    server.stop(grace=None)


@pytest.fixture
def grpc_client(grpc_server):
    with GrpcClient(MODEL, host="127.0.0.1", port=grpc_server[0], version=LATEST) as client:
        yield client


def test_grpc_predict_numpy(grpc_client, grpc_server):
    images = random_images(3, seed=6)
    result = grpc_client.predict(images)
    expected = fake_probabilities(images)
    np.testing.assert_array_equal(result.probabilities, expected)  # tensors travel exactly
    assert result.classes == fake_top_k(expected)[0]
    np.testing.assert_array_equal(result.scores, fake_top_k(expected)[1])
    request = grpc_server[1].requests[-1]
    assert (request.model_spec.name, request.model_spec.version.value) == (MODEL, LATEST)
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["image"]), images)


def test_grpc_predict_files_and_classify(grpc_client, grpc_server, tmp_path):
    images = random_images(2, seed=7)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(image))
    expected = fake_probabilities(images)
    result = grpc_client.predict(paths)
    np.testing.assert_array_equal(result.probabilities, expected)
    request = grpc_server[1].requests[-1]
    assert request.model_spec.signature_name == "serving_bytes"
    assert list(request.inputs["image_bytes"].string_val) == [p.read_bytes() for p in paths]
    results = grpc_client.classify([p.read_bytes() for p in paths])
    classes, scores = fake_top_k(expected)
    assert [[label for label, _ in row] for row in results] == classes
    np.testing.assert_allclose([[s for _, s in row] for row in results], scores, atol=1e-7)


def test_grpc_errors(grpc_server):
    port = grpc_server[0]
    client = GrpcClient(MODEL, host="127.0.0.1", port=port, signature_name="serving_bytse")
    assert client.signatures() == SIGNATURES
    with pytest.raises(ServingError) as info:
        client.predict(random_images(1))
    message = str(info.value)
    assert "FAILED_PRECONDITION" in message and "signature_name='serving_bytse'" in message
    assert str(SIGNATURES) in message and "Did you mean 'serving_bytes'?" in message
    with pytest.raises(ServingError, match=r"NOT_FOUND.*'tulips'"):
        GrpcClient("tulips", host="127.0.0.1", port=port).predict(random_images(1))
    with pytest.raises(ServingError, match="DEADLINE_EXCEEDED"):
        GrpcClient(SLOW, host="127.0.0.1", port=port, timeout=0.5).predict(random_images(1))


def test_grpc_closed_port_is_a_serving_error():
    client = GrpcClient(MODEL, host="127.0.0.1", port=closed_port(), timeout=2)
    with pytest.raises(ServingError, match="UNAVAILABLE|DEADLINE_EXCEEDED") as info:
        client.predict(random_images(1))
    assert client.target in str(info.value)
    client.close()
