"""The one exception tree of onnx_lapq: every message says what happened and what to do."""


class LapqError(Exception):
    """Base of every error onnx_lapq raises on purpose."""


class ConfigError(LapqError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelError(LapqError):
    """The input model cannot be read, normalized or quantized."""


class CalibrationError(LapqError):
    """The calibration data does not fit the model or cannot be used."""


class ExportError(LapqError):
    """The quantized model failed its own checks (onnx.checker, ONNX Runtime load)."""


class CheckpointError(ConfigError):
    """A search journal (checkpoint) cannot be read or does not belong to the run resuming it."""


class BitsFileError(ConfigError):
    """A bits file cannot be read or has the wrong shape (its message quotes the file's own keys)."""
