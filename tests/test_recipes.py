"""The recipes that build the reference artefacts: each runs from ``main(argv)``, resumes, and ends by
writing its artefact's card (command, data hashes, wall time, metrics). Small settings, real code."""

import json

import pytest
from conftest import TINY_MODEL_FLAGS

from course_utils import recipes
from course_utils.artefacts import read_card
from course_utils.recipes import base_model, sft_model, tokenizer
from course_utils.world import make_world


def test_the_chain_lists_every_recipe_in_order_and_refuses_what_it_does_not_know(capsys):
    assert recipes.main([]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == [r.name for r in recipes.RECIPES]
    assert listed.index("base-tokenizer") < listed.index("base-model") < listed.index("sft-model")
    assert recipes.main(["nonsense"]) == 2 and "no recipe called 'nonsense'" in capsys.readouterr().err
    assert recipes.main(["all", "--steps", "3"]) == 2 and "takes no arguments" in capsys.readouterr().err


def test_tokenizer_recipe_rebuilds_the_shipped_file_exactly(tmp_path, data_dir):
    out = tmp_path / "tokenizer.json"
    assert tokenizer.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((data_dir / "artefacts" / "tokenizer.json").read_text())
    card = read_card(out)
    assert card["command"] == f"python -m course_utils.recipes.tokenizer --out {out}"
    assert (
        card["wall_seconds"] > 0
        and card["metrics"]["n_vocab"] == 4096
        and set(card["data_sha256"]) == {"tinystories_train"}
    )


TINY = [
    *TINY_MODEL_FLAGS,
    "--sample-every",
    "0",
    "--probe-people",
    "2",
    "--n-eval",
    "4",
    "--reading-documents",
    "300",
    "--list-documents",
    "100",
    "--lookup-documents",
    "100",
]


def test_base_model_recipe_trains_on_the_mixture_resumes_and_writes_its_card(tmp_path, capsys):
    mixture = ["--reading", "0.1", "--lists", "0.1", "--copy", "0.1", "--copy-fade", "3", "--context-length", "256"]
    mixture += ["--lookups-start", "2", "--lookups-ramp", "1"]
    args = TINY + mixture + ["--out-dir", str(tmp_path / "run"), "--out", str(tmp_path / "base.pt")]
    assert base_model.main(args + ["--max-steps", "2"]) == 0
    assert read_card(tmp_path / "base.pt")["metrics"]["resumed_at_step"] is None
    assert base_model.main(args + ["--max-steps", "4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    card = read_card(tmp_path / "base.pt")
    metrics = card["metrics"]
    assert metrics["steps"] == 4 and metrics["resumed_at_step"] == 2 and metrics["tokens_seen"] == 4 * 4 * 256
    assert set(metrics["recall"]) == {"sft", "heldout", "retrieval"} and sum(
        metrics["mixture"].values()
    ) == pytest.approx(1)
    assert [step for step, _ in metrics["copy_score_curve"]] == [2, 4] and set(metrics["few_shot_heldout"]) == {
        "0",
        "1",
        "2",
        "4",
        "8",
    }
    assert 0 <= metrics["in_context_facts"] <= 1 and 0 <= metrics["in_context_facts_started"] <= 1
    assert metrics["copy_loss_first"] > 0 and metrics["mixture"]["lookups"] == 0.15
    assert metrics["lookups_start_step"] == 2 and metrics["lookups_ramp_steps"] == 1
    assert all([s for s, _ in curve] == [2, 4] for curve in metrics["probe_curves"].values())
    assert card["data_sha256"]["world_pretraining"] == make_world(0).pretraining_sha256()
    assert (
        card["command"].startswith("python -m course_utils.recipes.base_model --n-layer 1") and card["wall_seconds"] > 0
    )
    assert base_model.main(args + ["--copy", "0.9"]) == 1
    assert "leave room for the stories" in capsys.readouterr().err


def test_sft_recipe_fine_tunes_the_base_model_and_writes_its_card(tmp_path):
    out = tmp_path / "sft.pt"
    assert (
        sft_model.main(
            [
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--n-eval",
                "2",
                "--out-dir",
                str(tmp_path / "run"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    card = read_card(out)
    assert card["command"].endswith(f"--out {out}") and card["metrics"]["steps"] == 1
    for name in ("qa_sft", "qa_heldout", "reading_unseen", "reading_unseen_1to3_documents"):
        assert 0 <= card["metrics"][f"exact_match_{name}"] <= 1
    for name in (
        "declined_retrieval",
        "declined_qa_heldout",
        "reasoning_accuracy_heldout",
        "employer_city_accuracy_heldout",
        "employer_city_worked_share_heldout",
    ):
        assert 0 <= card["metrics"][name] <= 1
    # the default mixture: 2,000 worked reasoning problems and 2,000 two-hop ones, whose second hop is taught too
    assert card["metrics"]["sft_examples"]["reasoning"] == 4000 and card["metrics"]["sft_examples"]["qa"] == 3800
    assert set(card["data_sha256"]) == {"world_pretraining", "base_model", "tokenizer"}
