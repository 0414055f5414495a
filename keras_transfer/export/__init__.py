"""Export: SavedModel for TensorFlow Serving and LiteRT (TFLite) files.

Both take a plain `keras.Model` and write files; see `saved_model` and `tflite`.
"""

from keras_transfer.export.bundle import FORMATS, export_model, export_options
from keras_transfer.export.quantization_report import (
    QuantizationReport,
    format_quantization_report,
    quantization_report,
)
from keras_transfer.export.saved_model import next_version, saved_model, write_models_config
from keras_transfer.export.signatures import (
    BYTES_INPUT,
    CLASSES,
    IMAGE_INPUT,
    PROBABILITIES,
    SCORES,
    SERVING_BYTES,
    SERVING_DEFAULT,
    SERVING_TOKENS,
    TEXT_INPUT,
)
from keras_transfer.export.tflite import (
    IO_TYPES,
    QUANTIZATIONS,
    ParityReport,
    check_quantization,
    float32_model,
    float_ops,
    format_parity_table,
    read_tflite_labels,
    tflite,
    write_conversion_source,
)

__all__ = [
    "BYTES_INPUT",
    "CLASSES",
    "FORMATS",
    "IMAGE_INPUT",
    "IO_TYPES",
    "PROBABILITIES",
    "QUANTIZATIONS",
    "ParityReport",
    "QuantizationReport",
    "SCORES",
    "SERVING_BYTES",
    "SERVING_DEFAULT",
    "SERVING_TOKENS",
    "TEXT_INPUT",
    "check_quantization",
    "export_model",
    "export_options",
    "float32_model",
    "float_ops",
    "format_parity_table",
    "format_quantization_report",
    "next_version",
    "quantization_report",
    "read_tflite_labels",
    "saved_model",
    "tflite",
    "write_conversion_source",
    "write_models_config",
]
