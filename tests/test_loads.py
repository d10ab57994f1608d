"""Within a notebook each model is loaded once and reused: every `from_pretrained` of a model in the kernel is
counted (an IPython startup file wraps PreTrainedModel.from_pretrained), per notebook and folder."""
from __future__ import annotations

import collections
import json
import shutil

import pytest

COUNTER = '''
import json, os
import transformers.modeling_utils as modeling_utils

_load = modeling_utils.PreTrainedModel.from_pretrained.__func__


def _counted(cls, path, *args, **kwargs):
    with open(os.environ["KIT_TEST_LOAD_LOG"], "a") as f:
        f.write(json.dumps([cls.__name__, str(path)]) + "\\n")
    return _load(cls, path, *args, **kwargs)


modeling_utils.PreTrainedModel.from_pretrained = classmethod(_counted)
'''


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    """{notebook: Counter((class, folder relative to WORK))} for 04 and 05 run after 00-03 on the tiny model."""
    import jupytext
    import papermill

    from helpers.paths import NOTEBOOKS_DIR, work
    from helpers.runner import run_course

    root = tmp_path_factory.mktemp("loads")
    w = work(root / "work")
    assert run_course(w.root, only=["00", "01", "02", "03"], quiet=True) == 0
    startup = root / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-count-loads.py").write_text(COUNTER)
    counts = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPYTHONDIR", str(root / "ipython"))
        mp.setenv("KIT_HEADLESS", "1")
        for number in ("04", "05"):
            log = root / f"{number}.jsonl"
            mp.setenv("KIT_TEST_LOAD_LOG", str(log))
            source = next(NOTEBOOKS_DIR.glob(f"{number}_*.py"))  # the source as edited, not a stale .ipynb
            notebook = root / f"{number}.ipynb"
            jupytext.write(jupytext.read(source), notebook)
            papermill.execute_notebook(str(notebook), str(root / f"{number}.out.ipynb"), cwd=str(NOTEBOOKS_DIR),
                                       parameters={"work_dir": str(w.root)}, kernel_name="python3",
                                       progress_bar=False)
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            counts[number] = collections.Counter((cls, str(path).replace(str(w.root) + "/", "")) for cls, path in rows)
    yield counts
    shutil.rmtree(root, ignore_errors=True)


def test_notebook_04_loads_the_base_model_and_final_model_once(loads):
    counts = loads["04"]
    # the base model: once to train the over-fitted contrast, once for every comparison (both adapters on it)
    assert counts[("LlamaForCausalLM", "model")] == 2, counts
    # final_model: once for the table, the cost measures and the notebook chat; once by the web demo's own page
    assert counts[("LlamaForCausalLM", "final_model")] == 2, counts


def test_notebook_05_loads_each_vlm_folder_at_most_as_often_as_it_has_a_use(loads):
    counts = loads["05"]
    assert counts[("LlavaForConditionalGeneration", "vlm/base_model")] == 1, counts  # stage 1 trains it; the mask needs no weights
    # stage 2 trains on it, the stage-1 answers read it, the adapter sits on it (the merge folds that one in place)
    assert counts[("LlavaForConditionalGeneration", "vlm/aligned_model")] == 3, counts
    assert counts[("LlavaForConditionalGeneration", "vlm/final_model")] == 1, counts  # the merged model's own check
