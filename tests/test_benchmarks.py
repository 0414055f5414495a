"""Benchmarks: figures, interleaving, the registry, result files, each suite's quick path, the CLI.

No timing is asserted here: the suites run in quick mode only to prove their
code paths and what they report; their speed is the benchmark's business.
"""

import json
import os

import pytest
from conftest import assert_user_error, run_cli

from keras_transfer import benchmarks
from keras_transfer.benchmarks import Figure, Samples, interleave, resolve_suites, run_benchmarks
from keras_transfer.benchmarks import caching as caching_suite
from keras_transfer.benchmarks import export as export_suite
from keras_transfer.benchmarks import pipeline as pipeline_suite
from keras_transfer.benchmarks import scale as scale_suite
from keras_transfer.benchmarks import techniques as techniques_suite
from keras_transfer.benchmarks import time_to_accuracy as time_to_accuracy_suite
from keras_transfer.benchmarks import utilisation as utilisation_suite
from keras_transfer.benchmarks.timing import ratio_figures
from keras_transfer.export import QUANTIZATIONS

FIGURE_KEYS = {"value", "target", "met", "unit", "notes"}
MACHINE_KEYS = {"cpu", "cores", "memory_gib", "python", "tensorflow", "keras", "date"}


def assert_figure_schema(figure: dict):
    assert set(figure) == FIGURE_KEYS, figure
    assert figure["value"] is None or isinstance(figure["value"], (int, float))
    assert not isinstance(figure["value"], bool)
    assert figure["target"] is None or isinstance(figure["target"], str)
    assert figure["met"] in (True, False, None)
    assert (figure["met"] is None) == (figure["target"] is None or figure["value"] is None)
    assert isinstance(figure["unit"], str) and isinstance(figure["notes"], str)


@pytest.mark.parametrize(
    ("value", "target", "met"),
    [(0.99, ">= 0.98", True), (0.97, ">= 0.98", False), (12, "<= 5", False), (0.1, None, None)],
)
def test_figure_met_follows_target(value, target, met):
    figure = Figure(value, "x", target)
    assert figure.met is met
    assert_figure_schema(figure.to_dict())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": "about 1"}, ValueError, "Received: target='about 1'"),
        ({"value": True}, TypeError, "value of type bool"),
        ({"value": float("nan")}, ValueError, "Received: value=nan"),
    ],
)
def test_figure_refuses_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        Figure(**{"value": 1.0, "unit": "x", **kwargs})


def test_interleave_alternates_sides_and_needs_three_repeats():
    calls = []

    def side(name):
        return lambda: calls.append(name) or {"t": float(len(calls))}

    result = interleave({"a": side("a"), "b": side("b")}, repeats=3)
    assert calls == ["a", "b"] * 3
    assert result["a"]["t"].values == (1.0, 3.0, 5.0)
    with pytest.raises(ValueError, match="Received: repeats=2"):
        interleave({"a": side("a")}, repeats=2)


def test_ratio_figures_are_ratios_of_medians_and_of_mins():
    slow, fast = Samples((10.0, 30.0, 20.0)), Samples((1.0, 2.0, 4.0))
    figures = ratio_figures("speedup", slow, fast, target=">= 10")
    assert figures["speedup"].value == 10.0 and figures["speedup"].met
    assert figures["speedup_of_mins"].value == 10.0 and figures["speedup_of_mins"].target is None


def test_resolve_suites():
    assert resolve_suites("all") == tuple(benchmarks.SUITES)
    assert resolve_suites(["export", "overhead", "export"]) == ("export", "overhead")
    with pytest.raises(ValueError, match="Did you mean 'caching'\\? Received: suite='cashing'"):
        resolve_suites("overhead,cashing")
    with pytest.raises(ValueError, match="Received: suite=''"):
        resolve_suites("overhead,")


def test_register_suite_refuses_duplicates_and_all(monkeypatch):
    monkeypatch.setattr(benchmarks.registry, "SUITES", dict(benchmarks.SUITES))
    with pytest.raises(ValueError, match="already registered"):
        benchmarks.register_suite("overhead", lambda quick: {})
    with pytest.raises(ValueError, match="Received: name='all'"):
        benchmarks.register_suite("all", lambda quick: {})


def test_run_benchmarks_keeps_finished_suites_and_leaves_nothing_half_written(
    monkeypatch, tmp_path
):
    def fails(quick):
        raise RuntimeError("suite crashed")

    monkeypatch.setitem(benchmarks.SUITES, "fake_ok", lambda quick: {"answer": Figure(42, "")})
    monkeypatch.setitem(benchmarks.SUITES, "fake_fail", fails)
    with pytest.raises(RuntimeError, match="suite crashed"):
        run_benchmarks("fake_ok,fake_fail", tmp_path / "out", quick=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md"]
    with open(tmp_path / "out" / "results.json") as f:
        assert list(json.load(f)["figures"]) == ["fake_ok.answer"]
    # The first suite failing: the folders this run made are removed again.
    with pytest.raises(RuntimeError, match="suite crashed"):
        run_benchmarks("fake_fail", tmp_path / "new" / "out", quick=True)
    assert not (tmp_path / "new").exists()


def test_export_suite_quick():
    figures = export_suite.run(quick=True)
    for mode in QUANTIZATIONS:
        for name in ("size_mib", "accuracy", "top1_agreement", "latency_ms_p95", "b1_vs_keras"):
            assert f"{mode}.{name}" in figures
    for name in ("saved_model.b1_vs_keras", "saved_model.b32_ms_median", "keras.b32_ms_min"):
        assert name in figures
    # The float32 file computes what Keras computes; quantised files are smaller.
    assert figures["none.top1_agreement"].value == 1.0
    assert figures["none.max_abs_diff"].value <= 1e-5
    assert figures["none.accuracy"].value == figures["keras.accuracy"].value
    for mode in ("dynamic", "float16", "int8"):
        assert figures[f"{mode}.size_mib"].value < figures["none.size_mib"].value
    for figure in figures.values():
        assert_figure_schema(figure.to_dict())


def test_caching_suite_quick():
    figures = caching_suite.run(quick=True)
    assert figures["speedup"].target == caching_suite.SPEEDUP_TARGET
    assert figures["speedup"].value > 0 and figures["end_to_end_speedup"].value > 0
    # Same model, same start, same batches: the accuracies agree within noise.
    assert figures["accuracy_difference"].met
    for figure in figures.values():
        assert_figure_schema(figure.to_dict())


def test_pipeline_suite_quick():
    figures = pipeline_suite.run(quick=True)
    assert figures["ratio"].target == pipeline_suite.TARGET
    for name in ("folder.images_per_s", "memory.images_per_s", "decode_images_per_s"):
        assert figures[name].value > 0
    for figure in figures.values():
        assert_figure_schema(figure.to_dict())


def test_scale_suite_quick():
    figures = scale_suite.run(quick=True)
    sizes = scale_suite.QUICK["sizes"]
    for size in sizes:
        assert figures[f"{size}.scan_ms_per_file"].value > 0
        assert figures[f"{size}.images_per_s"].value > 0
        assert "cache mode 'memory'" in figures[f"{size}.peak_mib"].notes
    # The largest folder's peak memory is held to the image cache budget.
    assert figures[f"{sizes[-1]}.peak_mib"].target == "<= 1024"
    assert figures["throughput_vs_memory_cache"].target == scale_suite.THROUGHPUT_TARGET
    for figure in figures.values():
        assert_figure_schema(figure.to_dict())


def test_utilisation_suite_quick():
    figures = utilisation_suite.run(quick=True)
    assert figures["peak_gflops"].value > 0
    for side in ("training", "inference"):
        assert 0 < figures[f"{side}_fraction"].value < 1
    for figure in figures.values():
        assert_figure_schema(figure.to_dict())


def test_forward_flops_counts_a_dense_layer_by_hand():
    import keras

    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    # 5 x 4 multiply-adds (2 FLOPs each) plus 4 bias additions.
    assert utilisation_suite.forward_flops(model) == 5 * 4 * 2 + 4


def test_time_to_accuracy_suite_quick():
    figures = time_to_accuracy_suite.run(quick=True)
    for row in ("default", "keras_guide", "naive", "scratch"):
        # Quick runs aim at accuracy 0: every row reaches it after its first epoch.
        assert figures[f"{row}.epochs_to_target"].value == 1
        assert 0 <= figures[f"{row}.test_accuracy"].value <= 1
    assert figures["default_vs_naive_time"].target == time_to_accuracy_suite.TIME_RATIO_TARGET
    assert figures["default_minus_best_other_accuracy"].target == ">= 0"
    for figure in figures.values():
        assert_figure_schema(figure.to_dict())


def test_techniques_summary_reports_mean_and_min_of_margins():
    per_seed = [{"margin": 0.04, "accuracy": 0.8}, {"margin": 0.01, "accuracy": 0.6}]
    figures = techniques_suite.summarise("demo", per_seed, {"margin": ">= 0.02"})
    assert figures["demo.margin.mean"].value == 0.025 and figures["demo.margin.mean"].met
    assert figures["demo.margin.min"].value == 0.01 and not figures["demo.margin.min"].met
    assert (
        figures["demo.accuracy.mean"].value == 0.7 and figures["demo.accuracy.mean"].target is None
    )
    assert "demo.accuracy.min" not in figures
    with pytest.raises(ValueError, match="did not return its target figures \\['gain'\\]"):
        techniques_suite.summarise("demo", per_seed, {"gain": ">= 0"})


def test_techniques_suite_runs_every_effect_over_its_seeds(monkeypatch):
    # Each effect's own test measures it (one seed); here: the modules conform
    # and the suite calls every effect once per seed and summarises.
    for name in techniques_suite.EFFECTS:
        module = techniques_suite.effect_module(name)
        assert module.TARGETS and all(isinstance(t, str) for t in module.TARGETS.values())
    calls = []

    class FakeEffect:
        TARGETS = {"margin": ">= 0.1"}

        @staticmethod
        def measure(seed, quick=False):
            calls.append((seed, quick))
            return {"margin": 0.1 * (seed + 1), "accuracy": 0.5}

    monkeypatch.setattr(techniques_suite, "EFFECTS", ("fake",))
    monkeypatch.setattr(techniques_suite, "effect_module", lambda name: FakeEffect)
    figures = techniques_suite.run(quick=False)
    assert calls == [(seed, False) for seed in techniques_suite.SEEDS]
    assert figures["fake.margin.mean"].value == 0.2 and figures["fake.margin.min"].met
    assert figures["fake.seconds"].unit == "s"
    for figure in figures.values():
        assert_figure_schema(figure.to_dict())


def test_cli_benchmark_overhead_quick(tmp_path):
    result = run_cli("benchmark", "--suite=overhead", "--quick", "--output=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md"]
    with open(tmp_path / "out" / "results.json") as f:
        results = json.load(f)
    assert results["schema_version"] == benchmarks.SCHEMA_VERSION
    assert results["quick"] is True and results["suites"] == ["overhead"]
    assert set(results["machine"]) >= MACHINE_KEYS
    assert results["machine"]["cores"] >= 1
    assert results["runs"]["overhead"]["seconds"] > 0
    figures = results["figures"]
    assert figures["overhead.ratio"]["target"] == ">= 0.98"
    assert figures["overhead.ratio"]["unit"] == "x"
    for side in ("keras_transfer", "keras"):
        assert figures[f"overhead.{side}.images_per_s"]["value"] > 0
        assert f"overhead.{side}.step_ms_min" in figures
        assert f"overhead.{side}.step_ms_median" in figures
    for figure in figures.values():
        assert_figure_schema(figure)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert benchmarks.machine_line(results["machine"]) in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| overhead |")]
    assert len(rows) == len(figures)
    assert "| overhead | ratio |" in markdown
    assert "results.json" in result.stdout


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--suite=overhead,ovrhead"], ["suite='ovrhead'", "'overhead', 'export', 'caching'"]),
        ([], ["suite=[]", "'overhead', 'export', 'caching'"]),
    ],
)
def test_cli_benchmark_bad_suite_writes_nothing(tmp_path, flags, fragments):
    result = run_cli("benchmark", *flags, "--output=out", cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "out").exists()
