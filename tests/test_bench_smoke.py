"""Smoke test of tools/bench.py: a --quick run on mnist8 (w8a8, ort-minmax + minmax), and a
second run (mse) merged with it (--merge).

Needs the benchmark kit (../shared/kit next to the repo, or $ONNX_LAPQ_KIT) and
the `bench` extra (matplotlib, pillow); skips cleanly without them. Marked
slow (setup.cfg: "needs ../shared/kit"); it takes a few seconds.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _kit() -> Path:
    return Path(os.environ.get("ONNX_LAPQ_KIT") or REPO / ".." / "shared" / "kit").resolve()


@pytest.fixture(scope="module")
def kit() -> Path:
    path = _kit()
    if not (path / "eval.py").is_file():
        pytest.skip(f"benchmark kit not found at {path} (set ONNX_LAPQ_KIT)")
    for module in ("matplotlib", "PIL"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed (pip install .[bench])")
    return path


@pytest.mark.slow
def test_quick_bench_mnist8(kit, tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--kit", str(kit), "--models", "mnist8",
           "--configs", "w8a8", "--methods", "ort-minmax,minmax", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == {"ort-minmax", "minmax"}
    for method, row in rows.items():
        assert row["error"] is None, f"{method}: {row['error']}"
        assert row["model"] == "mnist8" and row["config"] == "w8a8"
        assert 98.0 < row["fp32_metric"] < 100.0
        assert row["metric"] > 90.0, f"{method}: top-1 {row['metric']}"
        assert row["quant_seconds"] > 0 and row["peak_rss_mb"] > 0
        assert row["ms_per_item"] > 0 and row["fp32_ms_per_item"] > 0
    for name in ("results.md", "accuracy_vs_bits.png", "quant_time.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| w8a8 | minmax |" in (tmp_path / "results.md").read_text()
    assert "rows made at commits" in (tmp_path / "results.md").read_text()
    assert all(r["git"] for r in rows.values())

    # --rescore: the saved models scored again, latency untouched
    proc = subprocess.run([*cmd, "--rescore"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rescored = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    for method, row in rows.items():
        assert rescored[method]["metric"] == row["metric"] and rescored[method]["kit_metric"] == row["kit_metric"]
        assert rescored[method]["ms_per_item"] == row["ms_per_item"]

    # a later run in another dir, merged: one table with both runs' rows
    later, merged = tmp_path / "later", tmp_path / "merged"
    proc = subprocess.run([*cmd[:cmd.index("--methods") + 1], "mse", "--quick", "--out", str(later)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--kit", str(kit), "--quick", "--out", str(merged),
                           "--merge", str(tmp_path), str(later)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged_rows = json.loads((merged / "results.json").read_text())
    assert sorted(r["method"] for r in merged_rows) == ["minmax", "mse", "ort-minmax"]
    assert "| w8a8 | mse |" in (merged / "results.md").read_text()


def _kitdata_module():
    sys.path.insert(0, str(REPO / "tools"))
    from benchkit import kitdata
    return kitdata


def test_top1_splits_ties_among_the_top_classes():
    kitdata = _kitdata_module()
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.3, 0.3, 0.3], [0.2, 0.2, 0.6]])
    labels = np.array([1, 1, 0, 0])
    # right, a two-way tie with the label in it, a three-way tie with it, wrong despite a tie below the top
    assert np.isclose(kitdata.top1_ties_split(scores, labels), (1 + 1 / 2 + 1 / 3 + 0) / 4)
    untied = np.random.default_rng(0).normal(size=(50, 10))
    truth = np.random.default_rng(1).integers(0, 10, 50)
    assert kitdata.top1_ties_split(untied, truth) == np.mean(untied.argmax(1) == truth)


def _fidelity_module():
    spec = importlib.util.spec_from_file_location("fidelity", REPO / "tools" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fidelity_measures():
    fidelity = _fidelity_module()
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    same = fidelity.classifier_fidelity(logits, logits + 5.0, probabilities=False)  # a shift of every score changes no probability
    assert same["agree"] == 100.0 and abs(same["kl"]) < 1e-12
    p, q = probs, probs[:, [1, 0, 2]]
    expected = np.mean(np.sum(p * np.log(p / q), 1))
    swapped = fidelity.classifier_fidelity(logits, logits[:, [1, 0, 2]], probabilities=False)
    assert swapped["agree"] == 0.0 and np.isclose(swapped["kl"], expected)
    assert np.isclose(fidelity.classifier_fidelity(p, q, probabilities=True)["kl"], expected)  # a graph ending in Softmax
    assert np.isclose(fidelity.embedding_fidelity(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))["cosine"], np.sqrt(0.5))


@pytest.mark.slow
def test_fidelity_of_the_fp32_model_to_itself(kit):
    fp32 = kit / "models" / "mnist" / "mnist8_onnxzoo_cntk.onnx"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "fidelity.py"), "--kit", str(kit), "--model", "mnist8", str(fp32)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert first.startswith("mnist8: FP32 top1 98.92 on 9744 items")
    assert second.endswith("top1 98.92 agree 100.0000 kl 0.0000")
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "fidelity.py"), "--kit", str(kit), "--model", "resnet", str(fp32)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a kit model" in bad.stderr


def _paired_module():
    spec = importlib.util.spec_from_file_location("paired", REPO / "tools" / "paired.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paired"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_top1_credit_per_item():
    kitdata = _kitdata_module()
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.3, 0.3, 0.3], [0.2, 0.2, 0.6]])
    assert np.allclose(kitdata.top1_credit(scores, np.array([1, 1, 0, 0])), [1, 1 / 2, 1 / 3, 0])


def test_paired_sign_test():
    paired = _paired_module()
    a = np.array([1, 1, 1, 0, 0.5, 1, 0, 1.0])
    b = np.array([1, 0, 0, 0, 1.0, 1, 1, 0.0])
    result = paired.paired(a, b)
    assert (result.wins, result.losses) == (3, 2) and np.isclose(result.net, a.sum() - b.sum())
    assert np.isclose(result.p, 1.0)  # 3 of 5: as even as 5 can be
    lopsided = paired.Paired(wins=10, losses=0, net=10.0)
    assert np.isclose(lopsided.p, 2 * 0.5**10)  # exact two-sided binomial
    assert paired.paired(a, a).p == 1.0 and paired.paired(a, a).net == 0.0
    # pooled over draws: an item counts once, with its differences summed over the draws
    items = np.array([7, 7, 7, 3, 3, 5, 5, 9])
    pooled = paired.paired(a, b, items)  # item 7: 0 +1 +1 -> win; 3: -0.5 -> loss; 5: -1 +0 -> loss; 9: +1 -> win
    assert (pooled.wins, pooled.losses) == (2, 2) and np.isclose(pooled.net, result.net)
    assert paired.paired(np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([4, 4])) == paired.Paired(0, 0, 0.0)


@pytest.mark.slow
def test_paired_compares_bench_models_item_by_item(kit, tmp_path):
    bench = [sys.executable, str(REPO / "tools" / "bench.py"), "--kit", str(kit), "--models", "mnist8", "--configs", "w8a8",
             "--methods", "ort-minmax,minmax", "--reps", "1", "--out", str(tmp_path)]
    proc = subprocess.run(bench, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    top1 = {r["method"]: r["metric"] for r in json.loads((tmp_path / "results.json").read_text())}
    tool = [sys.executable, str(REPO / "tools" / "paired.py"), "--kit", str(kit), "--results", str(tmp_path), "--model", "mnist8",
            "--config", "w8a8", "--method", "minmax"]
    proc = subprocess.run([*tool, "--against", "ort-minmax,fp32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines()[1:]}
    line = lines["seed 0 vs ort-minmax"]
    assert f"{top1['minmax']:.2f} against {top1['ort-minmax']:.2f}" in line
    wins, losses = (int(x) for x in line.split(", +")[1].split(", net")[0].split(" / -"))
    net = float(line.split("net ")[1].split(",")[0])
    assert np.isclose(net, (top1["minmax"] - top1["ort-minmax"]) * 9744 / 100, atol=0.05)
    assert abs(net) <= wins + losses  # ORT's quantized logits tie, so an item may differ by half a point
    assert "seed 0 vs best (ort-minmax)" in lines and "all 1 seeds vs fp32, items counted once" in lines
    missing = subprocess.run([*tool, "--against", "ort-minmax", "--seeds", "0,1"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no finished bench row for minmax seed 1, ort-minmax seed 1 (mnist8 w8a8)" in missing.stderr


def test_a_row_keeps_its_search_figures_when_its_long_report_is_gone(tmp_path):
    _kitdata_module()  # puts tools/ on the path, where bench.py finds benchkit
    spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from benchkit import report

    figures = {"nfev": 150, "final_loss": 0.25, "exported_loss": 0.25, "evaluator": {"cost_ratio": 1.95}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**figures, "loss_trace": [[i, 1.0 / (i + 1)] for i in range(500)]}))
    row = {"model": "m", "config": "w4a8", "method": "lapq", "metric": 69.69, "fp32_metric": 79.31}
    bench.attach_report(row, path)
    assert "report" not in row and row["report_path"] == str(path)  # too long to inline
    path.unlink()
    assert "| m | w4a8 | 79.31 |  |  | 69.69 |  | 150 | 1.95 | 1.0000 |" in report._summary([row])
    legacy = {k: v for k, v in row.items() if k != "search"}  # a row made before rows kept them, its report still there
    path.write_text(json.dumps(figures) + " " * 5000)
    (tmp_path / "results.json").write_text(json.dumps([legacy]))
    assert bench.read_rows(tmp_path / "results.json")[0]["search"] == figures


def test_method_names_carry_sparsity_and_mixed_precision_options():
    sys.path.insert(0, str(REPO / "tools"))
    from benchkit.runners import _mixed, _sparsity
    from benchkit.report import NOT_UNIFORM

    assert _sparsity("2:4") == __import__("onnx_lapq").SparsityOptions(pattern="2:4")
    options = _sparsity("4:8_transposable-approx_norepair")
    assert (options.pattern, options.masks, options.repair) == ("4:8", "transposable-approx", False)
    assert _mixed("mixed-b3.5").target_bits == 3.5 and _mixed("mixed-s0.15").target_size == 0.15
    assert _mixed("mixed-b4").candidate_bits == (2, 3, 4, 8)
    assert [bool(NOT_UNIFORM.match(m)) for m in ("2:4+minmax", "mixed-b4+adaround+mse", "adaround+mse", "lapq")] == [True, True, False, False]
