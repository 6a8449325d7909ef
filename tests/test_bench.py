import pytest

from course_utils import bench


def test_bench_prints_a_table_with_an_in_run_baseline(capsys):
    assert bench.main(["train", "--sizes", "tiny", "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2
    baseline, engine = (row.split(" | ") for row in rows)
    assert "baseline" in baseline[2] and baseline[4] == "1.00"
    assert float(engine[3].replace(",", "")) > 0 and float(engine[4]) > 0


def test_unknown_size_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["train", "--sizes", "huge"])
    assert "unknown sizes ['huge']" in capsys.readouterr().err


def test_throughput_is_positive_and_mfu_needs_a_known_gpu():
    result = bench.training_throughput(dict(n_layer=1, n_head=1, n_embd=16, context_length=8), 50, 2, steps=1)
    assert result.tokens_per_second > 0 and result.mfu is None and result.peak_memory_mib is None
