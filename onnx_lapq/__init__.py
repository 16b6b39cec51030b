"""onnx_lapq: loss-aware post-training quantization of ONNX models.

    import onnx, onnx_lapq
    result = onnx_lapq.quantize(onnx.load("model.onnx"), calibration, config=onnx_lapq.QuantConfig(weight_bits=4))
    onnx.save(result.model, "model.qdq.onnx")
"""
__version__ = "0.1.0"

from .config import QuantConfig
from .errors import CalibrationError, CheckpointError, ConfigError, ExportError, LapqError, ModelError
from .journal import SearchJournal
from .modelio import load_model, save_model_atomic
from .mixedoptions import MixedPrecisionOptions
from .options import CalibrationOptions, LapqOptions, ReconstructionOptions, SparsityOptions
from .pipeline import quantize
from .progress import Progress
from .result import QuantResult

__all__ = [
    "QuantConfig", "CalibrationOptions", "LapqOptions", "ReconstructionOptions", "SparsityOptions", "MixedPrecisionOptions", "QuantResult", "Progress", "quantize", "load_model", "save_model_atomic", "SearchJournal",
    "LapqError", "ConfigError", "ModelError", "CalibrationError", "ExportError", "CheckpointError",
]
