"""The merge check judges the whole model: every way a final_model can compute something else than base + adapter
is caught and named, a failed merge never replaces final_model, and a final_model is used only with its record."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_merge import make_adapter


@pytest.fixture(scope="module")
def merged(tiny_model_dir, tmp_path_factory):
    from helpers.merge import merge

    root = tmp_path_factory.mktemp("merge-check")
    adapter = make_adapter(tiny_model_dir, root / "adapter")
    return tiny_model_dir, adapter, merge(tiny_model_dir, adapter, root / "final_model").final_model


@pytest.fixture
def copy(merged, tmp_path):
    base, adapter, final = merged
    dst = tmp_path / "final_model"
    shutil.copytree(final, dst)
    return base, adapter, dst


def _edit_json(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _edit_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("*.safetensors")):
        save_file(change(load_file(f)), f, metadata={"format": "pt"})


def test_the_right_merge_passes_with_its_record(merged):
    from helpers.fingerprint import folder_hashes
    from helpers.merge import VERIFICATION_FILE, verify_merge

    base, adapter, final = merged
    check = verify_merge(final, base, adapter)
    assert check["passed"] and check["problems"] == [], check
    record = json.loads((final / VERIFICATION_FILE).read_text())
    assert record["passed"] and record["files"] == folder_hashes(final)


def test_a_missing_tensor_fails_and_is_named(copy):
    from helpers.merge import verify_merge

    base, adapter, final = copy
    _edit_tensors(final, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.down_proj.weight"})
    check = verify_merge(final, base, adapter)
    assert not check["passed"] and "lacks 1 tensor" in check["problem"]
    assert "model.layers.1.mlp.down_proj.weight" in check["problem"]


def test_an_extra_or_reshaped_tensor_fails(copy):
    from helpers.merge import verify_merge

    base, adapter, final = copy
    _edit_tensors(final, lambda t: t | {"model.extra.weight": torch.zeros(2, 2),
                                        "model.norm.weight": torch.ones(t["model.norm.weight"].numel() + 1)})
    problems = verify_merge(final, base, adapter)["problems"]
    assert any("model.extra.weight" in p for p in problems) and any("model.norm.weight has shape" in p for p in problems)


def test_a_changed_config_field_fails_and_is_named(copy):
    from helpers.merge import verify_merge

    base, adapter, final = copy

    def change(config):
        (config.get("rope_parameters") or config)["rope_theta"] = 1234.0

    _edit_json(final / "config.json", change)
    check = verify_merge(final, base, adapter)
    assert not check["passed"] and "rope_theta" in check["problem"] and "1234.0" in check["problem"], check


def test_a_changed_stop_token_fails(copy):
    from helpers.merge import verify_merge

    base, adapter, final = copy
    _edit_json(final / "generation_config.json", lambda g: g.update(eos_token_id=[5]))
    check = verify_merge(final, base, adapter)
    assert not check["passed"] and "generation_config.json's eos_token_id" in check["problem"], check


def test_a_changed_chat_template_fails(copy):
    from helpers.merge import verify_merge

    base, adapter, final = copy
    template = final / "chat_template.jinja"
    if template.exists():
        template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    else:
        _edit_json(final / "tokenizer_config.json", lambda t: t.update(chat_template=t["chat_template"] + " "))
    check = verify_merge(final, base, adapter)
    assert not check["passed"] and "chat template" in check["problem"], check


def test_the_base_posing_as_the_merge_fails(merged, tmp_path):
    from helpers.merge import verify_merge

    base, adapter, _ = merged
    check = verify_merge(base, base, adapter)
    assert not check["passed"] and "logits differ" in check["problem"], check


def test_a_merge_that_fails_its_check_keeps_the_previous_final_model(merged, tmp_path):
    from helpers.fingerprint import folder_hashes
    from helpers.merge import MergeError, merge

    base, adapter, final = merged
    keep = tmp_path / "final_model"
    shutil.copytree(final, keep)
    before = folder_hashes(keep) | {"verification.json": (keep / "verification.json").read_text()}
    other = make_adapter(base, tmp_path / "other", seed=1)
    with pytest.raises(MergeError, match="does not compute base \\+ adapter: .*the previous final_model is kept"):
        merge(base, other, keep, overwrite=True, tolerance=0.0)  # no merge meets a bound of 0
    assert folder_hashes(keep) | {"verification.json": (keep / "verification.json").read_text()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model", "other"]  # no staging folder left
    with pytest.raises(MergeError, match="nothing was written"):
        merge(base, other, tmp_path / "new_final", tolerance=0.0)
    assert not (tmp_path / "new_final").exists()


def test_a_final_model_is_used_only_with_a_matching_record(copy):
    from helpers.merge import UnverifiedModelError, require_verified

    _, _, final = copy
    assert require_verified(final) == ""
    _edit_tensors(final, lambda t: {k: v + 1e-3 if k.endswith("norm.weight") else v for k, v in t.items()})
    with pytest.raises(UnverifiedModelError, match="model.safetensors changed since the merge was verified"):
        require_verified(final)
    assert require_verified(final, allow_unverified=True).startswith("UNVERIFIED MODEL: ")
    (final / "verification.json").unlink()
    with pytest.raises(UnverifiedModelError, match="has no verification record"):
        require_verified(final)


def test_a_final_model_merged_from_another_adapter_is_refused_beside_the_new_one(copy, tmp_path):
    """Notebook 02 (or an XTuner import) ran again after 03: 04 and 06 would show another adapter's merge."""
    from helpers.merge import UnverifiedModelError, require_verified

    base, adapter, final = copy
    assert require_verified(final, adapter=adapter) == ""
    retrained = make_adapter(base, tmp_path / "retrained", seed=5)
    with pytest.raises(UnverifiedModelError, match="was merged from another adapter than .*retrained holds now"):
        require_verified(final, adapter=retrained)
    assert require_verified(final) == ""  # the merged model alone is still what it was verified as


def test_chat_and_web_refuse_an_unverified_final_model(copy, capsys):
    from helpers.__main__ import main

    _, _, final = copy
    _edit_json(final / "verification.json", lambda r: r.update(passed=False, problem="its logits differ"))
    assert main(["chat", str(final)]) == 2
    assert "failed its merge check (its logits differ)" in capsys.readouterr().err
    assert main(["web", str(final)]) == 2
    assert "--unverified" in capsys.readouterr().err


def test_publishing_refuses_an_unverified_final_model(course_work, tmp_path):
    from helpers.paths import work as make_work
    from helpers.publish import PublishError, build_model_repo

    w = make_work(tmp_path / "w")
    shutil.copytree(course_work.final_model, w.final_model)
    (w.final_model / "verification.json").unlink()
    with pytest.raises(PublishError, match="no verification record"):
        build_model_repo(w, "m")
    assert not w.model_repo.exists()
