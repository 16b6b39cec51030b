"""A local worker process of executor.py: ``python -m onnx_lapq.worker``, fed over its pipes."""
from .executor import serve_pipes

if __name__ == "__main__":
    serve_pipes()
