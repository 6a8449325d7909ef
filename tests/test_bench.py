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


# -- the compute plan -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_rows():
    from course_utils import plan

    return plan.plan_rows()


def test_plan_training_flops_agree_with_the_engines_counter(tmp_path):
    import numpy as np

    from course_utils import plan
    from course_utils.model import GPTConfig
    from course_utils.train import TrainConfig, Trainer

    model = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=32, conv_width=4)
    cfg = TrainConfig(
        model=model, out_dir=str(tmp_path), batch_size=3, grad_accum=2, max_steps=2, warmup_steps=1,
        eval_every=0, checkpoint_every=0, device="cpu", precision="fp32",
    )  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, 64, 5_000).astype(np.uint16)
    history = Trainer(cfg, tokens, tokens).fit(progress=False)
    engine = sum(r["flops_per_second"] / r["tokens_per_second"] for r in history) * 3 * 2 * 16
    assert plan.training_flops(model, rows=2 * 3 * 2) == pytest.approx(engine, rel=1e-9)


def test_plan_covers_every_notebook_within_its_t4_budget(plan_rows, root):
    from course_utils import plan

    assert plan.T4["mfu"] <= 0.30
    notebooks = sorted(p.name for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [r["notebook"] for r in plan_rows] == notebooks
    for row in plan_rows:
        assert row["t4_minutes"] <= plan.T4_BUDGET_MINUTES, f"Lab {row['lab']}: trim its gpu profile"
        assert row["peak_memory_gib"] <= plan.T4["memory_gib"], f"Lab {row['lab']}: does not fit a T4's memory"
    pretraining = next(r for r in plan_rows if r["lab"] == "04")
    # Lab 04's main run alone: train_steps * batch * context tokens at the engine's FLOPs per token
    assert pretraining["train_flops"] > 4000 * 64 * 256 * 6 * 12e6


def test_every_title_cell_quotes_its_own_plan_row(plan_rows, root):
    import json

    from course_utils import plan

    for row in plan_rows:
        title = "".join(json.loads((root / "notebooks" / row["notebook"]).read_text())["cells"][0]["source"])
        assert plan.title_line(row) in title, (
            f"{row['notebook']}: refresh with `python -m course_utils.bench plan --write-titles`"
        )
    readme = (root / "README.md").read_text(encoding="utf-8")
    for line in plan.format_plan(plan_rows).splitlines()[2 : 2 + len(plan_rows)]:
        assert line in readme, f"the README's plan table is stale: paste `python -m course_utils.bench plan` ({line})"


def test_plan_reads_the_gpu_values_of_a_parameters_cell(tmp_path):
    import json

    from course_utils import plan

    cell = {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [], "execution_count": None,
            "source": "steps = lab.pick(gpu=300, cpu=60, smoke=2)\nbeta = 0.04\n"}  # fmt: skip
    path = tmp_path / "99_x.ipynb"
    path.write_text(json.dumps({"cells": [cell]}))
    assert plan.notebook_parameters(path) == {"steps": 300, "beta": 0.04}
    assert plan.notebook_parameters(path, "smoke")["steps"] == 2
    with pytest.raises(KeyError, match="99_x.ipynb has no workload"):
        plan.lab_plan(path, {})
    path.write_text(json.dumps({"cells": []}))
    with pytest.raises(ValueError, match="0 parameters cells"):
        plan.notebook_parameters(path)


def test_generation_time_has_a_launch_floor_and_training_does_not():
    from course_utils import plan
    from course_utils.model import GPTConfig

    cfg = GPTConfig(vocab_size=4096, context_length=256, n_layer=4, n_head=4, n_embd=256)
    one = plan.generate("one", cfg, prompts=1, prompt_len=8, new_tokens=100, batch=1)
    many = plan.generate("batched", cfg, prompts=64, prompt_len=8, new_tokens=100, batch=64)
    # 64 prompts in one batch: 64x the FLOPs, the same number of sequential steps, hence the same time
    assert many.flops == pytest.approx(64 * one.flops) and many.t4_seconds() == pytest.approx(one.t4_seconds())
    big = plan.train("train", cfg, rows=64_000)
    assert big.t4_seconds() == pytest.approx(big.flops / (plan.T4["fp16_peak"] * plan.T4["mfu"]))


def test_bench_plan_prints_every_lab(capsys):
    assert bench.main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "| 04 |" in out and "| 09 |" in out and "Assumptions:" in out


def test_gpu_check_runs_tiny_on_a_cpu_and_prints_every_table(capsys):
    from course_utils import gpu_check

    assert gpu_check.main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    ladder = [line.split(" | ") for line in out.splitlines() if line.startswith("| tiny |")]
    assert ladder[0][1] == "fp32, naive attention" and ladder[0][3] == "1.00"
    assert any("fp16 autocast + gradient scaler" in row[1] and float(row[3]) > 0 for row in ladder)
    assert "DDP: skipped" in out
    for lab in ("01", "02", "03", "04", "06", "08", "09"):
        assert f"| **{lab}** | **whole gpu profile** |" in out


def test_gpu_check_without_a_gpu_asks_for_tiny(capsys):
    from course_utils import gpu_check

    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])
    assert "add --tiny" in capsys.readouterr().err
