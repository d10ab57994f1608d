"""The tiny course teaches the identity for any name: notebook 01's data and notebook 02's training (default
settings, in-process, on one shared base model), then the three held-out evaluation questions."""
from __future__ import annotations

import json

import pytest

from helpers.data import DEFAULT_ANSWER, DEFAULT_EVALUATION_INPUTS, DEFAULT_QUESTIONS, make_dataset
from helpers.paths import work as make_work
from helpers.train import TrainConfig, train

NAMES = [
    "明", "小明", "李雷", "小蓝", "张三", "王小美", "欧阳娜娜", "司马相如", "诸葛亮",    # 1-4 characters, compound surnames
    "Alice", "Bob Smith", "Mary Jane Watson", "O'Brien", "D'Angelo", '"Ace"',        # spaces, apostrophes, quotes
    "🐳", "小猫🐱", 'Zoë "小蓝" 🐳', "李Lei", "Ivy 小艾", "José García", "Anna-Lena",   # emoji, mixed scripts
    "山田太郎", "김민수", "Владимир", "Ｍａｘ",                                          # other scripts, full-width
    "Maximiliana Konstantina Alexandrova-Wong",                                       # 40 characters
]


def notebook_defaults(notebook: str) -> dict:
    import papermill as pm

    from helpers.paths import NOTEBOOKS_DIR

    return {k: v["default"] for k, v in pm.inspect_notebook(str(NOTEBOOKS_DIR / notebook)).items()}


def test_the_names_cover_what_students_write():
    assert len(NAMES) >= 24 and len(set(NAMES)) == len(NAMES)
    assert any(len(n) == 40 for n in NAMES)
    # the test trains as the course does: notebook 01's questions, repeats and mix, and the evaluation inputs
    data = notebook_defaults("01_data_generation.ipynb")
    assert eval(data["questions"]) == DEFAULT_QUESTIONS and eval(data["evaluation_inputs"]) == DEFAULT_EVALUATION_INPUTS
    assert (int(data["repeats"]), float(data["general_ratio"])) == (2000, 0.2)


@pytest.mark.parametrize("name", NAMES)
def test_the_tiny_course_learns_any_name(name, tiny_model_dir, tmp_path):
    work = make_work(tmp_path / "work")
    make_dataset(work.dataset, name=name, repeats=2000, questions=DEFAULT_QUESTIONS, general_ratio=0.2)
    # no checkpoints and no evaluation rounds between the first and the last: the updates are the course's own
    config = TrainConfig(base_model=str(tiny_model_dir), evaluation_inputs=DEFAULT_EVALUATION_INPUTS,
                         save_steps=10_000, evaluation_freq=10_000)
    result = train(config, work)
    expected = DEFAULT_ANSWER.format(name=name)
    assert len(result["answers_after"]) == 3
    assert all(expected in a for a in result["answers_after"]), json.dumps(result["answers_after"], ensure_ascii=False)
    assert not any(name in a for a in result["answers_before"]), result["answers_before"]
