"""The benchmark script runs (tiny shape, on the CPU) and writes its numbers; no timing is asserted."""
import importlib.util
import json
from pathlib import Path


def test_bench_step_writes_json(tmp_path):
    path = Path(__file__).resolve().parent.parent / "bench" / "step.py"
    spec = importlib.util.spec_from_file_location("bench_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--shape", "tiny", "--seq-len", "16", "--steps", "1", "--out", str(tmp_path / "step.json")])
    (result,) = json.loads((tmp_path / "step.json").read_text())  # one setup: --trl not asked for
    assert result["setup"] == "simpo" and result["seq_len"] == 16 and result["tokens_per_s"] > 0
    assert result["device"] == "cpu"
