"""Continual learning: the Fisher estimate, the LwF loss, EWC's penalty, and the effect on split digits."""

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.benchmarks.effects import continual as effect
from keras_transfer.techniques.continual import add_task, learn_new_task
from keras_transfer.techniques.ewc import EWCTrainer, estimate_fisher
from keras_transfer.techniques.lwf import LwFLoss


def _softmax_model(kernel, bias):
    inputs = keras.Input((kernel.shape[0],))
    model = keras.Model(
        inputs, keras.layers.Dense(kernel.shape[1], activation="softmax", name="head")(inputs)
    )
    model.get_layer("head").set_weights([kernel, bias])
    return model


def _closed_form_fisher(kernel, bias, x, y):
    """Mean of squared gradients of log softmax(x W + b)[y]: x (e_y - p)^T and e_y - p."""
    logits = x @ kernel + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    residual = np.eye(kernel.shape[1])[y] - p
    grad_kernel = x[:, :, None] * residual[:, None, :]
    return (grad_kernel**2).mean(0), (residual**2).mean(0), p


def test_empirical_fisher_matches_the_closed_form_of_a_logistic_model():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 3)).astype("float32")
    bias = rng.normal(size=3).astype("float32")
    x = rng.normal(size=(12, 4)).astype("float32")
    y = rng.integers(0, 3, 12)
    fisher = estimate_fisher(_softmax_model(kernel, bias), x, y, method="empirical")
    expected_kernel, expected_bias, _ = _closed_form_fisher(kernel, bias, x, y)
    np.testing.assert_allclose(fisher[0], expected_kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fisher[1], expected_bias, rtol=1e-4, atol=1e-6)


def test_sampled_fisher_estimates_the_expectation_over_the_models_labels():
    kernel = np.array([[1.0, -0.5]], "float32")
    bias = np.zeros(2, "float32")
    x = np.ones((800, 1), "float32")
    fisher = estimate_fisher(_softmax_model(kernel, bias), x, np.zeros(800, int), seed=0)
    # E_y~p [(e_y - p)^2] summed over both labels, exactly.
    _, _, p = _closed_form_fisher(kernel, bias, x[:1], np.zeros(1, int))
    expected = sum(p[0, c] * (np.eye(2)[c] - p[0]) ** 2 for c in range(2))
    np.testing.assert_allclose(fisher[1], expected, rtol=0.1)
    # The labels given are not used: all-zero labels would give another value.
    empirical = estimate_fisher(
        _softmax_model(kernel, bias), x[:1], np.zeros(1, int), method="empirical"
    )
    assert abs(float(empirical[1][0]) - float(expected[0])) > 0.05


def test_lwf_loss_is_kl_between_temperature_softened_recorded_and_current_outputs():
    recorded = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "float32")
    current = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]], "float32")
    t = 2.0

    def soft(p):
        q = p ** (1 / t)
        return q / q.sum(-1, keepdims=True)

    expected = (soft(recorded) * np.log(soft(recorded) / soft(current))).sum(-1).mean()
    loss = LwFLoss(temperature=t)
    assert float(loss(recorded, current)) == pytest.approx(expected, rel=1e-5)
    assert float(loss(recorded, recorded)) == pytest.approx(0.0, abs=1e-7)
    assert LwFLoss.from_config(loss.get_config()).temperature == t
    with pytest.raises(ValueError, match="Received: temperature=0"):
        LwFLoss(temperature=0)


def test_ewc_penalty_is_half_lambda_fisher_weighted_squared_distance():
    model = _softmax_model(np.zeros((2, 2), "float32"), np.zeros(2, "float32"))
    kernel, bias = model.get_layer("head").weights
    fisher = [np.full((2, 2), 3.0, "float32"), np.full(2, 5.0, "float32")]
    trainer = EWCTrainer(model, [kernel, bias], fisher, ewc_lambda=4.0)
    assert float(trainer.ewc_penalty()) == 0.0
    kernel.assign(np.full((2, 2), 0.5, "float32"))
    bias.assign(np.array([1.0, 0.0], "float32"))
    # lambda / 2 * (4 weights * 3 * 0.25 + 5 * 1)
    assert float(trainer.ewc_penalty()) == pytest.approx(2.0 * (3.0 + 5.0))


@pytest.fixture(scope="module")
def digits():
    return effect.split_digits(per_class=12)


def _two_heads(seed=0):
    model = effect.mlp_classifier(5, 16, seed)
    keras.utils.set_random_seed(seed)
    return add_task(model, "digits_b", 5)


def test_add_task_keeps_the_old_head_and_shares_the_backbone():
    model = effect.mlp_classifier(5, 16, seed=0)
    two = add_task(model, "digits_b", 5)
    assert two.output_names == ["digits_b", "head"]
    assert two.get_layer("head") is model.get_layer("head")
    assert two.get_layer("backbone") is model.get_layer("backbone")
    x = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(two.predict(x, verbose=0)["head"], model.predict(x, verbose=0))


def test_every_method_trains_the_backbone_the_same_way(digits):
    (a_train, a_test), (b_train, _) = digits["a"], digits["b"]
    results = {}
    for method in ("naive", "lwf", "ewc"):
        model = _two_heads()
        before = [w.copy() for w in model.get_layer("backbone").get_weights()]
        results[method] = learn_new_task(
            model,
            b_train,
            task="digits_b",
            method=method,
            old_data=a_train if method == "ewc" else None,
            old_test=a_test,
            epochs=1,
            learning_rate=1e-2,
            verbose=0,
        )
        after = model.get_layer("backbone").get_weights()
        assert all(not np.allclose(b, a) for b, a in zip(before, after, strict=True)), method
    epochs = {method: len(result.history.epoch) for method, result in results.items()}
    assert set(epochs.values()) == {1}, epochs
    assert set(results["lwf"].old_accuracy_after) == {"head"}
    assert "head_loss" in results["lwf"].history.history


def test_the_two_head_model_round_trips_and_exports(digits, tmp_path):
    (_, a_test), (b_train, _) = digits["a"], digits["b"]
    model = _two_heads()
    learn_new_task(model, b_train, task="digits_b", epochs=1, verbose=0)
    x = a_test[0][:4]
    model.save(tmp_path / "two_heads.keras")
    loaded = keras.saving.load_model(tmp_path / "two_heads.keras", safe_mode=True)
    assert loaded.output_names == ["digits_b", "head"]
    expected = model.predict(x, verbose=0)
    for head, values in loaded.predict(x, verbose=0).items():
        np.testing.assert_allclose(values, expected[head], atol=1e-6)
    path = kt.export.saved_model(model, str(tmp_path / "export"), models_config=False)
    import tensorflow as tf

    serving = tf.saved_model.load(path).signatures["serving_default"]
    outputs = serving(**{next(iter(serving.structured_input_signature[1])): tf.constant(x)})
    for head in ("head", "digits_b"):
        name = head if head in outputs else f"{head}_probabilities"
        np.testing.assert_allclose(
            outputs[name].numpy(), model.predict(x, verbose=0)[head], atol=1e-5
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "replay"}, "Received: method='replay'"),
        ({"method": "ewc"}, "needed by method='ewc'"),
        ({"method": "lwf", "old_data": "given"}, "Received: method='lwf', old_data=given"),
        ({"task": "nope"}, "Received: task='nope'"),
        ({"temperature": 0.0}, "Received: temperature=0.0"),
        ({"lwf_weight": -1.0}, "Received: lwf_weight=-1.0"),
        ({"fisher_labels": "true"}, "Received: fisher_labels='true'"),
        ({"epochs": 0}, "Received: epochs=0"),
    ],
)
def test_learn_new_task_refuses_bad_input(digits, kwargs, match):
    (b_train, _) = digits["b"]
    model = _two_heads()
    options = {"task": "digits_b", **kwargs}
    if options.get("old_data") == "given":
        options["old_data"] = b_train
    with pytest.raises(ValueError, match=match):
        learn_new_task(model, b_train, verbose=0, **options)


def test_add_task_and_learn_new_task_refuse_bad_models(digits):
    model = effect.mlp_classifier(5, 16, seed=0)
    with pytest.raises(ValueError, match="Received: name='backbone'"):
        add_task(model, "backbone", 3)
    with pytest.raises(ValueError, match="Received: name='task b'"):
        add_task(model, "task b", 3)
    with pytest.raises(ValueError, match="Received: num_classes=0"):
        add_task(model, "b", 0)
    with pytest.raises(ValueError, match="two or more heads"):
        learn_new_task(model, digits["b"][0], task="head", verbose=0)
    regression = kt.build_image_classifier(
        model.get_layer("backbone"), 1, weights=None, head="regression"
    )
    with pytest.raises(ValueError, match="old heads must be softmax"):
        learn_new_task(add_task(regression, "b", 5), digits["b"][0], task="b", verbose=0)
    with pytest.raises(ValueError, match="Received: method='exact'"):
        estimate_fisher(model, digits["a"][0][0], digits["a"][0][1], method="exact")


@pytest.mark.slow  # 9-24 s on 2 shared cores
def test_lwf_and_ewc_keep_the_old_task_that_naive_fine_tuning_forgets():
    figures = effect.measure(seed=0)
    assert figures["old_accuracy_before"] >= 0.95, figures
    assert figures["naive_old_accuracy"] <= figures["old_accuracy_before"] - 0.10, figures
    assert figures["lwf_margin"] >= 0.10, figures
    assert figures["ewc_margin"] >= 0.10, figures
    for method in effect.METHODS:
        assert figures[f"{method}_new_accuracy"] >= 0.9, figures
