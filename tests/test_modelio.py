"""Model files (onnx_lapq.modelio): a model whose weights are external data reads as the same
model; save_model_atomic replaces its target whole or not at all, leaves no temporary file,
spills large weights to <out>.data, gives new files the umask's mode and never modifies the
model it writes."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from conftest import conv_chain_model, random_inputs, run_cli
from onnx_lapq import ModelError, quantize, save_model_atomic
from onnx_lapq import largemodel
from onnx_lapq.modelio import save_text_atomic


def test_save_model_atomic_leaves_no_temp_files(tmp_path):
    model = quantize(conv_chain_model(), random_inputs(conv_chain_model(), 32)).model
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old contents")
    save_model_atomic(model, str(target))
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert target.read_bytes() == model.SerializeToString()


def test_save_model_atomic_failure_keeps_old_file(tmp_path):
    class Broken:
        graph = onnx.GraphProto()  # no initializers, no other fields: a small model

        def ListFields(self):
            return []

        def SerializeToString(self):
            raise RuntimeError("disk full")

    target = tmp_path / "out.onnx"
    target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError):
        save_model_atomic(Broken(), str(target))
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert target.read_bytes() == b"old contents"


def test_save_model_atomic_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        save_model_atomic(conv_chain_model(), str(tmp_path / "nope" / "out.onnx"))
    assert os.listdir(tmp_path) == []


def test_save_model_atomic_external_data_path(tmp_path, monkeypatch):
    """Over the protobuf limit (lowered here) the weights go to <out>.data beside the model."""
    monkeypatch.setattr(largemodel, "PROTOBUF_LIMIT", 100)
    model = conv_chain_model()
    expected = conv_chain_model()
    save_model_atomic(model, str(tmp_path / "out.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    loaded = onnx.load(str(tmp_path / "out.onnx"))
    for a, b in zip(loaded.graph.initializer, expected.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


@pytest.fixture
def umask_027():
    """Files created meanwhile get mode 0o640 (0o666 less the umask)."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_save_model_atomic_gives_the_mode_of_a_new_file(tmp_path, monkeypatch, umask_027):
    """The renamed temporary file keeps the mode any new file gets (a private 0o600 from
    mkstemp would lock other users and services out of the model), external data too."""
    save_model_atomic(conv_chain_model(), str(tmp_path / "small.onnx"))
    monkeypatch.setattr(largemodel, "PROTOBUF_LIMIT", 100)
    save_model_atomic(conv_chain_model(), str(tmp_path / "big.onnx"))
    save_text_atomic("{}", str(tmp_path / "report.json"))
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in os.listdir(tmp_path)}
    assert modes == dict.fromkeys(["small.onnx", "big.onnx", "big.onnx.data", "report.json"], umask_027)


def test_save_model_atomic_does_not_modify_model(tmp_path, monkeypatch):
    monkeypatch.setattr(largemodel, "PROTOBUF_LIMIT", 100)
    model = conv_chain_model()
    before = model.SerializeToString()
    save_model_atomic(model, str(tmp_path / "out.onnx"))
    assert model.SerializeToString() == before


@pytest.mark.slow
def test_cli_reads_external_data_model(tmp_path):
    model = conv_chain_model()
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(conv_chain_model(), str(src / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (src / "weights.bin").stat().st_size > 1000
    assert (src / "model.onnx").stat().st_size < 2000  # the weights really are outside
    calib = random_inputs(model, 40)[0]
    np.savez(tmp_path / "calib.npz", **calib)
    out = tmp_path / "out.onnx"
    proc = run_cli(src / "model.onnx", out, "--calib", tmp_path / "calib.npz")
    assert proc.returncode == 0, proc.stderr
    from_file = onnx.load(str(out))
    in_memory = quantize(model, [calib]).model
    assert from_file.SerializeToString() == in_memory.SerializeToString()
