"""The benchmark script runs (tiny shape, on the CPU) and writes its numbers; no timing is asserted.
The committed length profile is what the real pairs give, and on it the packed layout computes at
most 1.05x the minimum token positions at micro-batches of 2 and 4."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "bench" / "lengths-ultrafeedback200.json"
FIXTURES = REPO.parent / "shared" / "fixtures"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "bench" / "step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_step_writes_json(tmp_path):
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"lengths": [[1, 3, 4], [1, 6, 1], [9, 4, 4]]}))
    load_bench().main(["--shape", "tiny", "--lengths", lengths, "--batch-size", 2,
                       "--micro-batch-size", 2, "--steps", 1, "--padded",
                       "--out", tmp_path / "step.json"])
    simpo, padded = json.loads((tmp_path / "step.json").read_text())  # --trl not asked for
    assert (simpo["setup"], padded["setup"]) == ("simpo", "simpo-padded")
    for result in (simpo, padded):
        assert result["tokens_per_s"] > 0 and result["peak_gib"] > 0 and result["device"] == "cpu"
    assert padded["project_speedup"] > 0 and padded["project_memory_ratio"] > 0
    # 4 pairs (2 steps), 2 per forward: any two fit one packed row of 2 × 13 − 1 tokens
    computed = simpo["computed_tokens_vs_minimum"]
    assert computed["packed"] == 1 < computed["padded"]


def test_real_lengths_compute_near_the_minimum():
    report = load_bench().token_report(load_bench().load_lengths(PROFILE))
    for micro_batch in (2, 4):
        ratios = report[f"micro_batch_{micro_batch}"]
        # padding and the second prompt: gone
        assert ratios["packed"] <= 1.05 and ratios["padded"] > 1.5


@pytest.mark.skipif(not (FIXTURES / "real-data").is_dir(), reason="needs ../shared/fixtures")
def test_length_profile_is_the_real_pairs(tmp_path):
    lengths = load_bench().make_lengths(FIXTURES / "real-data" / "ultrafeedback_trl_eval200.jsonl",
                                        FIXTURES / "real-tokenizers" / "llama3-instruct",
                                        tmp_path / "l.json")
    assert [list(pair) for pair in load_bench().load_lengths(PROFILE)] == lengths
    assert (tmp_path / "l.json").read_text() == PROFILE.read_text()


def test_the_real_model_bench_keeps_the_committed_numbers_unless_asked():
    spec = importlib.util.spec_from_file_location("real_model", REPO / "bench" / "real_model.py")
    real_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_model)
    assert real_model.parse_args([]).out == "runs/real-model.json"


def test_demo_help_writes_nothing():
    files = sorted((REPO / "data").rglob("*.jsonl"))
    before = [f.stat().st_mtime_ns for f in files]
    result = subprocess.run([sys.executable, "demo.py", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "toy preference" in result.stdout
    assert [f.stat().st_mtime_ns for f in files] == before


def test_the_degeneration_table_is_the_rule_applied_to_the_recorded_rounds():
    """bench/degeneration.json: each run's stops are the rule applied to its recorded verdicts, and
    with generation.STOP_AFTER no healthy run stops while every collapse does."""
    import generation
    script = REPO / "bench" / "degeneration.py"
    spec = importlib.util.spec_from_file_location("degeneration", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.stop_step([(2, ""), (4, "x"), (6, ""), (8, "x"), (10, "x")], 2) == 10
    assert bench.stop_step([(2, "x"), (4, "")], 2) is None
    report = json.loads((REPO / "bench" / "degeneration.json").read_text())
    assert report["stop_after"] == generation.STOP_AFTER
    names = set()
    for run in report["runs"]:
        names.add(run["name"])
        for after in bench.RULES:
            assert run[f"stops_after_{after}"] == bench.stop_step(run["rounds"], after)
        stops = run[f"stops_after_{generation.STOP_AFTER}"]
        assert (stops is None) == (run["kind"] == "healthy"), run["name"]
    assert {"SmolLM2 lr 3e-4", "SmolLM2 lr 3e-3"} <= names
