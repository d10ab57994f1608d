"""What the fine-tune cost: base, base + adapter and final_model through lm-eval (the kit's offline task), the
held-out chat loss and the identity on unseen paraphrases; numbers that tell the base from the fine-tune."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

MODELS = ["base", "base + adapter", "final_model"]


@pytest.fixture(scope="module")
def evaluated(course_work, tmp_path_factory):
    """`python -m helpers evaluate` on a copy of the course's work dir (its results written afresh there)."""
    root = tmp_path_factory.mktemp("evaluate") / "work"
    shutil.copytree(course_work.root, root, ignore=shutil.ignore_patterns("executed", "report", "publish", "vlm"))
    (root / "results" / "evaluation.json").unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-m", "helpers", "evaluate", str(root)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads((root / "results" / "evaluation.json").read_text(encoding="utf-8")), root


def test_the_fine_tune_moves_the_identity_and_the_loss_and_merging_changes_nothing(evaluated):
    out, result, _ = evaluated
    rows = result["models"]
    assert list(rows) == MODELS and result["tasks"] == ["course_mc"]
    identity = "identity on held-out paraphrases"
    assert rows["base"][identity] <= 0.2 and rows["final_model"][identity] >= 0.8  # low before, high after
    loss = "held-out chat loss"
    assert rows["base"][loss] != pytest.approx(rows["final_model"][loss], abs=1e-3)  # the fine-tune shows
    for measure, value in rows["final_model"].items():  # the merge is base + adapter
        assert value == pytest.approx(rows["base + adapter"][measure], abs=1e-3), measure
    for row in rows.values():
        assert 0 <= row["accuracy: course_mc"] <= 1 and (row["accuracy: course_mc"] * 40) % 1 == pytest.approx(0)
    assert "delta" in out and identity in out


def test_the_table_shows_the_deltas(evaluated):
    from helpers.evaluate import cost_rows, cost_table

    _, result, _ = evaluated
    table = cost_table(result)
    assert list(table.columns) == MODELS + ["delta"]
    assert table.loc["identity on held-out paraphrases", "delta"] >= 0.6
    rows = cost_rows(result)
    assert rows[0][0] == "accuracy: course_mc" and rows[0][-1][0] in "+-"


def test_the_model_card_and_the_report_show_the_table(evaluated, tmp_path):
    from helpers.paths import work
    from helpers.publish import model_card
    from helpers.report import fine_tune_cost_section

    _, result, root = evaluated
    w = work(root)
    shares = [result["models"][m]["identity on held-out paraphrases"] for m in MODELS]
    card = model_card(w, "my-assistant")
    table = card.split("## What the fine-tune cost")[1].split("##")[0]
    assert "| identity on held-out paraphrases | " + " | ".join(f"{v:.3f}" for v in shares) + " | +" in table
    section = fine_tune_cost_section(w)
    assert section.ran and section.blocks[0][0] == "table" and len(section.blocks[0][2]) == len(result["models"]["base"])
    empty = work(tmp_path)
    assert not fine_tune_cost_section(empty).ran and "What the fine-tune cost" not in model_card(empty, "x")


def test_notebook_04_shows_what_the_fine_tune_cost(course_work):
    result = json.loads(course_work.result("evaluation").read_text(encoding="utf-8"))
    assert list(result["models"]) == MODELS and result["sources"]


def test_the_kits_task_is_an_lm_eval_task_of_40_bilingual_questions():
    from lm_eval.tasks import TaskManager

    from helpers.evaluate import COURSE_TASK, COURSE_TASK_FILE

    assert COURSE_TASK in TaskManager(include_path=str(COURSE_TASK_FILE.parent), include_defaults=False).all_tasks
    records = [json.loads(line) for line in (COURSE_TASK_FILE.parent / "course_mc.jsonl").read_text().splitlines()]
    assert len(records) == 40 and sum(r["lang"] == "zh" for r in records) == 20
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and r["answer"] in range(4) for r in records)
    assert {r["answer"] for r in records} == {0, 1, 2, 3}  # the right answer is not always in one place


@pytest.mark.parametrize("args, says", [
    (["--tasks", "cmmlu_anatomyy"], "is not an lm-eval task"),
    (["--tasks", "cmmlu_anatomy", "--limit", "2"], "could not be downloaded"),
])
def test_bad_tasks_are_one_sentence(course_work, args, says):
    import os

    result = subprocess.run([sys.executable, "-m", "helpers", "evaluate", str(course_work.root), *args],
                            capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_work_dir_without_a_run_is_one_sentence(tmp_path):
    result = subprocess.run([sys.executable, "-m", "helpers", "evaluate", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "run notebooks 00-03" in result.stderr and "Traceback" not in result.stderr
