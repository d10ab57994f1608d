"""Homework: student versions blank exactly the solution regions, and the checker passes a good work dir
and fails broken ones with the right reason."""
from __future__ import annotations

import json
import os
import shutil

import nbformat
import pytest

from helpers.__main__ import main
from helpers.homework import BEGIN, END, MarkerError, blank_solutions, check_work, make_student
from helpers.paths import NOTEBOOKS_DIR, work as make_work

TODO_START = "# TODO: your part"


def _without_regions(source: str) -> list[str]:
    out, inside = [], False
    for line in source.split("\n"):
        if line.strip() == BEGIN:
            inside = True
        elif line.strip() == END:
            inside = False
        elif not inside:
            out.append(line)
    return out


def _without_todos(source: str) -> list[str]:
    out, inside = [], False
    for line in source.split("\n"):
        if line.strip().startswith(TODO_START):
            inside = True
        elif inside and line.strip() == "raise NotImplementedError":
            inside = False
        elif not inside:
            out.append(line)
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    assert main(["homework", "make-student", str(out)]) == 0
    return out


def test_student_versions_differ_only_in_the_solution_regions(student_dir):
    teacher_books = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert sorted(p.name for p in student_dir.glob("*.ipynb")) == [p.name for p in teacher_books]
    regions = {}
    for book in teacher_books:
        teacher, student = nbformat.read(book, 4), nbformat.read(student_dir / book.name, 4)
        assert len(teacher.cells) == len(student.cells)
        regions[book.name] = 0
        for t, s in zip(teacher.cells, student.cells):
            assert (t.cell_type, t.metadata) == (s.cell_type, s.metadata)
            assert "NBVAL_CHECK_OUTPUT" not in s.source  # the test suite's marker stays out of the handout
            t.source = "\n".join(line for line in t.source.split("\n") if line != "# NBVAL_CHECK_OUTPUT")
            if t.cell_type == "code" and BEGIN in t.source:
                regions[book.name] += t.source.count(BEGIN)
                assert s.source.count("raise NotImplementedError") == t.source.count(BEGIN)
                assert BEGIN not in s.source and END not in s.source
                assert _without_regions(t.source) == _without_todos(s.source)
            else:
                assert s.source == t.source and s.get("outputs") == t.get("outputs")
    assert regions["00_environment.ipynb"] == 0 and regions["01_data_generation.ipynb"] == 2
    assert regions["02_qlora_finetune.ipynb"] == 1 and regions["05_vlm_llava_finetune.ipynb"] == 1
    student01 = next(c.source for c in nbformat.read(student_dir / "01_data_generation.ipynb", 4).cells
                     if "raise NotImplementedError" in c.source)  # the cell with the student's first region
    assert 'name = "小明"' not in student01 and "evaluation_inputs = [" not in student01
    assert "# - set `name`: whose assistant it is" in student01  # the teacher's hint stays
    # 02 and 05: the student sets one plain dict; every call stays in the handout
    student02 = "\n".join(c.source for c in nbformat.read(student_dir / "02_qlora_finetune.ipynb", 4).cells)
    assert "# - set `my_changes`: the knobs you change, e.g. dict(lr=1e-3, lora_r=8)" in student02
    assert "config = TrainConfig(" in student02 and ".changed(my_changes).resolved()" in student02
    student05 = "\n".join(c.source for c in nbformat.read(student_dir / "05_vlm_llava_finetune.ipynb", 4).cells)
    assert "# - set `stage2_changes`: stage 2 knobs" in student05 and "config2 = vt.stage_config(2, preset" in student05


def test_every_blanked_region_raises_not_implemented(student_dir):
    blanked = 0
    for book in sorted(student_dir.glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(book, 4).cells):
            lines = cell.source.split("\n")
            for n, line in enumerate(lines):
                if line.strip().startswith(TODO_START):
                    # The cell up to the end of this TODO block, run alone, stops at the NotImplementedError.
                    stop = next(k for k in range(n, len(lines)) if lines[k].strip() == "raise NotImplementedError")
                    with pytest.raises(NotImplementedError):
                        exec(compile("\n".join(lines[: stop + 1]), f"{book.name} cell {i + 1}", "exec"), {})
                    blanked += 1
    assert blanked >= 3


def test_student_notebooks_stop_at_the_marked_cell_when_run(student_dir, course_work, tmp_path):
    """Every handout with a TODO runs, on a finished course's work dir, up to its first TODO: no earlier cell fails."""
    import papermill as pm

    work = tmp_path / "work"
    shutil.copytree(course_work.root, work, symlinks=True)
    with_todo = [p.name for p in sorted(student_dir.glob("*.ipynb"))
                 if any(TODO_START in c.source for c in nbformat.read(p, 4).cells)]
    assert with_todo == ["01_data_generation.ipynb", "02_qlora_finetune.ipynb", "05_vlm_llava_finetune.ipynb",
                         "06_publish.ipynb"]
    for name in with_todo:
        cells = [c for c in nbformat.read(student_dir / name, 4).cells if c.cell_type == "code"]
        first = next(i for i, c in enumerate(cells) if TODO_START in c.source)
        with pytest.raises(pm.PapermillExecutionError) as err:
            pm.execute_notebook(str(student_dir / name), str(tmp_path / name),
                                parameters={"work_dir": str(work)}, cwd=str(NOTEBOOKS_DIR),
                                kernel_name="python3", progress_bar=False)
        assert err.value.ename == "NotImplementedError", f"{name}: {err.value.ename}: {err.value.evalue}"
        ran = [c for c in nbformat.read(tmp_path / name, 4).cells if c.cell_type == "code"
               and "injected-parameters" not in c.metadata.get("tags", [])]
        failed = [i for i, c in enumerate(ran) if any(o.get("output_type") == "error" for o in c.outputs)]
        assert failed == [first], f"{name} failed in code cell {failed}, not the marked cell {first}"


def test_blanking_keeps_indentation_and_hints():
    src = "x = 1\nif True:\n    ### BEGIN SOLUTION\n    lr = 2e-4  # the learning rate\n    ### END SOLUTION\ny = 2"
    out, n = blank_solutions(src)
    assert n == 1
    assert out.split("\n") == ["x = 1", "if True:", "    # TODO: your part (write it here).",
                               "    # - set `lr`: the learning rate", "    raise NotImplementedError", "y = 2"]
    with pytest.raises(NotImplementedError):
        exec(compile(out, "student", "exec"), {})


def test_blanking_names_each_assignment_of_a_multi_line_region():
    src = ("### BEGIN SOLUTION\nmy_changes = dict(  # the knobs you change\n    lr=1e-3,\n    lora_r=8,\n)\n"
           "name: str = \"Ada\"  # whose assistant\n### END SOLUTION\nprint(my_changes)")
    out, n = blank_solutions(src)
    assert n == 1 and out.split("\n") == ["# TODO: your part (write it here).",
                                          "# - set `my_changes`: the knobs you change",
                                          "# - set `name`: whose assistant", "raise NotImplementedError",
                                          "print(my_changes)"]  # not `lr` or `lora_r`: they are keywords


@pytest.mark.parametrize("source, problem", [
    ("### BEGIN SOLUTION\nx = 1", "line 1: '### BEGIN SOLUTION' is never closed"),
    ("x = 1\n### END SOLUTION", "line 2: '### END SOLUTION' without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "line 2: '### BEGIN SOLUTION' inside"),
])
def test_unbalanced_markers_name_notebook_cell_and_line(tmp_path, source, problem):
    books = tmp_path / "notebooks"
    books.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell(source)])
    nbformat.write(nb, books / "07_extra.ipynb")
    out = tmp_path / "student"
    with pytest.raises(MarkerError, match=rf"07_extra.ipynb: code cell 2: {problem}"):
        make_student(out, books)
    assert not out.exists()  # nothing half-written


def test_make_student_never_overwrites_the_teacher_notebooks():
    with pytest.raises(SystemExit, match="teacher"):
        make_student(NOTEBOOKS_DIR)


# ---------------------------------------------------------------- the checker
def _statuses(checks):
    return {c.name: c.status for c in checks}


def test_check_passes_on_a_good_work_dir(course_work, capsys):
    checks = check_work(course_work.root, publish=True, allow_practice_remote=True)
    assert _statuses(checks) == {"base": "PASS", "dataset": "PASS", "identity": "PASS", "overfitting": "PASS",
                                 "merge": "PASS", "vlm": "PASS", "publish": "PASS"}, checks
    name = json.loads(course_work.result("01_data_generation").read_text(encoding="utf-8"))["name"]
    assert name in next(c.reason for c in checks if c.name == "identity")
    assert "practice remote, not published" in next(c.reason for c in checks if c.name == "publish")
    assert main(["homework", "check", str(course_work.root), "--publish", "--allow-practice-remote"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_a_practice_remote_is_not_a_publication(course_work):
    publish = {c.name: c for c in check_work(course_work.root, publish=True, skip=ONLY_PUBLISH)}["publish"]
    assert publish.status == "FAIL" and "practice remote, not published" in publish.reason
    assert "--allow-practice-remote" in publish.reason


@pytest.fixture
def broken(course_work, tmp_path):
    dst = tmp_path / "work"
    shutil.copytree(course_work.root, dst, symlinks=True)
    return make_work(dst)


ALL = {"base", "identity", "overfitting", "merge", "vlm", "publish"}
ONLY_PUBLISH = ALL - {"publish"}


def _only(*names):
    """--skip for every check but these (and the dataset's, which every check needs)."""
    return ALL - set(names)


def _check(work_root, *names, **kw):
    return {c.name: c for c in check_work(work_root, skip=_only(*names), **kw)}


def _rewrite_json(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(change(data), ensure_ascii=False), encoding="utf-8")


def _edit_safetensors(directory, change):
    from safetensors.torch import load_file, save_file

    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no weights in {directory}"
    for f in files:
        save_file(change(load_file(f)), f, metadata={"format": "pt"})


def test_check_fails_when_the_dataset_lacks_the_name(broken):
    name = json.loads(broken.result("01_data_generation").read_text(encoding="utf-8"))["name"]
    text = broken.dataset.read_text(encoding="utf-8")
    broken.dataset.write_text(text.replace(name, "某人"), encoding="utf-8")
    dataset = _check(broken.root, name=name)["dataset"]
    assert dataset.status == "FAIL" and "changed after the adapter was trained" in dataset.reason


def test_the_expected_name_comes_from_the_training_data_not_a_results_file(broken):
    name = json.loads(broken.result("01_data_generation").read_text(encoding="utf-8"))["name"]
    _rewrite_json(broken.result("01_data_generation"), lambda r: {**r, "name": "张三", "answer": "我是张三的小助手"})
    checks = _check(broken.root, "identity")
    assert checks["dataset"].status == "PASS" and repr(name) in checks["dataset"].reason
    assert checks["identity"].status == "PASS" and repr(name) in checks["identity"].reason


def test_check_fails_when_the_adapter_learned_nothing(broken):
    import torch

    _edit_safetensors(broken.adapter, lambda t: {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in t.items()})
    identity = _check(broken.root, "identity")["identity"]
    assert identity.status == "FAIL" and "without" in identity.reason


def test_check_fails_when_the_teacher_expects_another_name(broken):
    checks = _check(broken.root, "identity", name="张三")
    assert checks["dataset"].status == "FAIL" and checks["identity"].status == "FAIL"
    assert "'张三'" in checks["identity"].reason


def test_the_teachers_hidden_questions_are_asked(broken, tmp_path):
    hidden = tmp_path / "hidden.txt"
    hidden.write_text("What is the capital of France?\n1 + 1 = ?\n", encoding="utf-8")
    identity = _check(broken.root, "identity", questions_file=str(hidden))["identity"]
    assert identity.status == "FAIL" and "questions it never trained on" in identity.reason, identity


def test_the_over_fitted_contrast_handed_in_fails(broken):
    """The adapter over-fitted on purpose (notebook 04's contrast), with its data, merged and handed in."""
    from helpers.base_model import base_model_path
    from helpers.merge import merge

    for part in ("adapter", "data"):
        shutil.rmtree(getattr(broken, part))
        shutil.copytree(broken.contrast / part, getattr(broken, part))
    merge(base_model_path(broken), broken.adapter, broken.final_model, overwrite=True)
    checks = _check(broken.root, "identity", "overfitting", "merge")
    assert checks["overfitting"].status == "FAIL" and "over-fitted" in checks["overfitting"].reason, checks
    assert checks["merge"].status == "PASS"  # a right merge of a wrong adapter: the over-fitting check is what fails


def test_a_final_model_without_its_output_layer_fails(broken):
    _edit_safetensors(broken.final_model, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    merge = _check(broken.root, "merge")["merge"]
    assert merge.status == "FAIL" and "lm_head.weight" in merge.reason, merge


def test_a_final_model_with_another_rope_theta_fails(broken):
    def change(config):
        (config.get("rope_parameters") or config)["rope_theta"] = 5000.0
        return config

    _rewrite_json(broken.final_model / "config.json", change)
    merge = _check(broken.root, "merge")["merge"]
    assert merge.status == "FAIL" and "rope_theta" in merge.reason, merge


def test_check_decides_with_its_own_tolerance_and_needs_the_adapter(broken):
    from helpers.base_model import base_model_path

    # final_model is a plain copy of the base; the student's results claim a loose tolerance and a pass
    _rewrite_json(broken.result("03_merge"), lambda r: {**r, "tolerance": 100, "passed": True})
    shutil.rmtree(broken.final_model)
    shutil.copytree(base_model_path(broken), broken.final_model)
    merge = _check(broken.root, "merge")["merge"]
    assert merge.status == "FAIL" and "not base + adapter" in merge.reason, merge
    with pytest.raises(SystemExit) as refused:  # there is no way to take the student's word for it
        main(["homework", "check", str(broken.root), "--trust-results"])
    assert refused.value.code == 2


def test_a_deleted_vlm_with_a_made_up_results_file_fails(broken):
    shutil.rmtree(broken.vlm)
    broken.result("05_vlm_llava_finetune").write_text(
        json.dumps({"questions": ["q"], "before": ["x"], "after": ["y"]}), encoding="utf-8")
    vlm = _check(broken.root, "vlm")["vlm"]
    assert vlm.status == "FAIL" and "05_vlm_llava_finetune" in vlm.reason, vlm


def test_a_vlm_that_learned_nothing_fails(broken):
    """The fine-tuned VLM replaced by the stage-1 model: the checker asks it, and it does not answer as trained."""
    shutil.rmtree(broken.vlm_final_model)
    shutil.copytree(broken.vlm_aligned_model, broken.vlm_final_model)
    vlm = _check(broken.root, "vlm")["vlm"]
    assert vlm.status == "FAIL" and "gives the trained answer to only" in vlm.reason, vlm


def test_a_notebook_that_did_not_run_fails_its_check(broken, capsys):
    broken.result("03_merge").unlink()
    shutil.rmtree(broken.final_model)
    merge = _check(broken.root, "merge")["merge"]
    assert merge.status == "FAIL" and "notebook 03_merge did not run" in merge.reason
    assert main(["homework", "check", str(broken.root), "--skip", ",".join(_only("merge"))]) == 1
    assert "FAILED: merge" in capsys.readouterr().out


def test_publish_is_checked_only_when_asked(broken):
    broken.result("06_publish").unlink()
    assert _check(broken.root, "publish")["publish"].status == "SKIP"
    publish = _check(broken.root, "publish", publish=True)["publish"]
    assert publish.status == "FAIL" and "06_publish did not run" in publish.reason


def test_an_invented_hub_url_and_commit_fail(broken):
    _rewrite_json(broken.result("06_publish"), lambda r: {
        **r, "push": {**(r.get("push") or {}), "remote": "https://127.0.0.1:9/someone/model.git", "commit": "1" * 40}})
    publish = _check(broken.root, "publish", publish=True)["publish"]
    assert publish.status == "FAIL" and "cannot be read back" in publish.reason, publish


def test_another_students_remote_fails(broken, tmp_path):
    """The results point at a remote that holds another repository (another student's push)."""
    import subprocess

    other = tmp_path / "other-remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(broken.publish_remote), str(other)], check=True)
    shutil.copytree(broken.publish_remote / "lfs", other / "lfs")  # the weights are there too
    clone = tmp_path / "other"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "GIT_LFS_SKIP_PUSH": "1"}
    subprocess.run(["git", "clone", "-q", str(other), str(clone)], check=True, env=env)
    (clone / "README.md").write_text("another student's card\n", encoding="utf-8")
    subprocess.run(["git", "-C", str(clone), "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qam", "other"],
                   check=True)
    subprocess.run(["git", "-C", str(clone), "push", "-q", "origin", "HEAD"], check=True, env=env)
    _rewrite_json(broken.result("06_publish"), lambda r: {
        **r, "push": {**(r.get("push") or {}), "remote": other.as_uri()}})
    publish = _check(broken.root, "publish", publish=True, allow_practice_remote=True)["publish"]
    assert publish.status == "FAIL" and "does not hold this work's model repository" in publish.reason, publish


def test_the_tiny_base_fails_where_the_class_requires_another(broken, tmp_path):
    from helpers.tiny_model import build_tiny_model

    required = build_tiny_model(tmp_path / "required", seed=7)  # same shape, other weights: another model
    base = _check(broken.root, "base", require_base=str(required))["base"]
    assert base.status == "FAIL" and "but the class requires" in base.reason, base
    own = _check(broken.root, "base", require_base=str(broken.model), require_preset="homework")["base"]
    assert own.status == "FAIL" and "not trained with preset homework" in own.reason, own
    assert _check(broken.root, "base", require_base=str(broken.model), require_preset="tiny")["base"].status == "PASS"


# ---------------------------------------------------------------- an adapter trained in XTuner
def _as_xtuner_checkpoint(adapter, path, system: str, lora_b=None):
    """The course's trained adapter as `xtuner train` saves a LoRA run on this (Llama-layout) base: iter_N.pth
    whose state_dict names the LoRA as XTuner's SupervisedFinetune does (llm.…lora_A.default.weight) and whose meta
    keeps the config's text (r, lora_alpha, SYSTEM)."""
    from collections import OrderedDict

    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    state = OrderedDict()
    for key, tensor in load_file(str(adapter / "adapter_model.safetensors")).items():
        if ".lora_B." in key and lora_b is not None:
            tensor = lora_b(tensor)
        state["llm." + key.replace(".lora_A.weight", ".lora_A.default.weight")
              .replace(".lora_B.weight", ".lora_B.default.weight")] = tensor
    cfg = (f"SYSTEM = {system!r}\nmodel = dict(type='xtuner.model.SupervisedFinetune', lora=dict("
           f"type='peft.LoraConfig', r={config['r']}, lora_alpha={config['lora_alpha']}, lora_dropout=0.1, "
           "bias='none', task_type='CAUSAL_LM'))\n")
    path.parent.mkdir(parents=True)
    torch.save({"meta": {"cfg": cfg, "iter": 768}, "state_dict": state}, str(path))
    return path


def _import_and_merge(work, checkpoint):
    from helpers.base_model import base_model_path
    from helpers.merge import merge
    from helpers.xtuner import XTUNER_RECORD, import_adapter

    shutil.rmtree(work.adapter)
    assert import_adapter(work, checkpoint) == work.adapter and (work.adapter / XTUNER_RECORD).exists()
    assert not (work.adapter / "training_record.json").exists()
    merge(base_model_path(work), work.adapter, work.final_model, overwrite=True)


def test_an_adapter_trained_in_xtuner_is_graded_on_what_it_answers(broken, tmp_path):
    """No training record: the grader still loads base + the converted adapter and the merged model and asks them."""
    _import_and_merge(broken, _as_xtuner_checkpoint(broken.adapter, tmp_path / "xtuner" / "iter_768.pth", ""))
    checks = _check(broken.root, "identity", "overfitting", "merge")
    assert {n: c.status for n, c in checks.items() if c.status != "SKIP"} == \
        {"dataset": "PASS", "identity": "PASS", "overfitting": "PASS", "merge": "PASS"}, checks
    assert "converted from XTuner's iter_768.pth" in checks["dataset"].reason


def test_an_xtuner_adapter_that_learned_nothing_fails(broken, tmp_path):
    import torch

    zeroed = _as_xtuner_checkpoint(broken.adapter, tmp_path / "xtuner" / "iter_768.pth", "", lora_b=torch.zeros_like)
    _import_and_merge(broken, zeroed)
    checks = _check(broken.root, "identity", "merge")
    assert checks["identity"].status == "FAIL" and "without" in checks["identity"].reason, checks["identity"]
    assert checks["merge"].status == "FAIL" and "barely changes the base" in checks["merge"].reason, checks["merge"]


def test_the_grader_asks_with_the_system_prompt_xtuner_trained_with(broken, tmp_path):
    from helpers.homework.answers import _system
    from helpers.xtuner import import_adapter

    checkpoint = _as_xtuner_checkpoint(broken.adapter, tmp_path / "xtuner" / "iter_768.pth", "你是小明的小助手")
    shutil.rmtree(broken.adapter)
    import_adapter(broken, checkpoint)
    assert _system(broken) == "你是小明的小助手"


def test_a_name_that_begins_with_a_dash_is_a_name_on_the_command_line(tmp_path, capsys):
    """`homework check WORK --name -Ann`: the value, not an unknown option (argparse's own reading)."""
    from helpers.__main__ import joined_text_options

    assert main(["homework", "check", str(tmp_path / "missing"), "--name", "-Ann"]) == 1  # checked, not an error 2
    assert "does not exist" in capsys.readouterr().out
    assert joined_text_options(["chat", "m", "--system", "-be brief-", "--name", "-h"]) == \
        ["chat", "m", "--system=-be brief-", "--name", "-h"]
