import os

import pytest
from dataset_layouts import make_crisismmd, write_truncated_jpeg
from prep_helpers import read_outputs, run_prep, skipped_reasons

from mysproj.errors import BadInput

LABELS = ["affected_individuals", "infrastructure_and_utility_damage", "rescue_volunteering_or_donation_effort",
          "vehicle_damage", "not_humanitarian", "injured_or_dead_people", "missing_or_found_people"]


def _rows(per_label=2):
    return {split: [(None, label) for label in LABELS for _ in range(per_label)] for split in ("train", "dev", "test")}


def test_default_four_classes_from_label_image(tmp_path):
    rows = _rows()
    rows["test"].append(("data_image/hurricane_harvey/1_1_2017/missing_0.jpg", "vehicle_damage"))
    src = make_crisismmd(str(tmp_path / "CrisisMMD_v2.0"), rows)
    write_truncated_jpeg(os.path.join(src, "data_image", "bad.jpg"))
    with open(os.path.join(src, "crisismmd_datasplit_all", "task_humanitarian_text_img_train.tsv"), "a") as f:
        f.write("\t".join(["e", "1", "1_0", "t", "data_image/bad.jpg", "x", "x", "vehicle_damage", "x"]) + "\n")
        f.write("too\tfew\tcolumns\n")
    run_prep(tmp_path / "o", dataset="crisismmd", source=src)
    o = read_outputs(tmp_path / "o")
    assert o["classes"]["classes"] == ["affected individuals", "infrastructure and utility damage",
                                       "rescue volunteering or donation effort", "vehicle damage"]
    assert o["classes"]["task"] == "humanitarian categories of disaster images"
    rep = o["report"]
    assert rep["counts"]["train"]["total"] == 8 and rep["counts"]["test"]["total"] == 8
    assert rep["notes"]["rows_of_other_classes"] == {"injured_or_dead_people": 4, "missing_or_found_people": 4,
                                                     "not_humanitarian": 4}
    reasons = skipped_reasons(rep)
    assert reasons["missing_0.jpg"].endswith("but missing")
    assert reasons["bad.jpg"].startswith("corrupt image")
    assert any(r.startswith("malformed row") for r in reasons.values())
    assert all(s["image"].startswith(os.path.join(src, "data_image")) for s in o["samples"])


def test_merge_map_and_all_classes(tmp_path):
    src = make_crisismmd(str(tmp_path / "c"), _rows(per_label=1))
    merge = '{"injured_or_dead_people": "affected_individuals", "missing_or_found_people": "affected_individuals"}'
    run_prep(tmp_path / "o", dataset="crisismmd", source=src, crisismmd_merge=merge, crisismmd_classes="")
    rep = read_outputs(tmp_path / "o")["report"]
    assert rep["n_classes"] == 5
    assert rep["counts"]["train"]["per_class"]["affected individuals"] == 3
    assert rep["counts"]["train"]["per_class"]["not humanitarian"] == 1


def test_label_column_option(tmp_path):
    src = make_crisismmd(str(tmp_path / "c"), _rows(per_label=1))
    # label_text is "not_humanitarian" everywhere in this fixture: the default 4 classes are absent from it
    with pytest.raises(BadInput, match=r"class 'affected_individuals' .* no rows in column 'label_text'"):
        run_prep(tmp_path / "o", dataset="crisismmd", source=src, crisismmd_label_column="label_text")
    with pytest.raises(BadInput, match="at least two"):
        run_prep(tmp_path / "o", dataset="crisismmd", source=src, crisismmd_label_column="label_text",
                 crisismmd_classes="")


def test_path_escaping_root_in_tsv(tmp_path):
    rows = _rows(per_label=1)
    rows["test"].append(("../outside.jpg", "vehicle_damage"))
    src = make_crisismmd(str(tmp_path / "c"), rows)
    with pytest.raises(BadInput, match=r"task_humanitarian_text_img_test\.tsv line 9: path '\.\./outside\.jpg' "
                                       r"escapes the dataset root"):
        run_prep(tmp_path / "o", dataset="crisismmd", source=src)


def test_missing_split_file(tmp_path):
    src = make_crisismmd(str(tmp_path / "c"), _rows(per_label=1))
    os.remove(os.path.join(src, "crisismmd_datasplit_all", "task_humanitarian_text_img_train.tsv"))
    with pytest.raises(BadInput, match=r"task_humanitarian_text_img_train\.tsv is missing"):
        run_prep(tmp_path / "o", dataset="crisismmd", source=src)


def test_missing_label_column(tmp_path):
    src = make_crisismmd(str(tmp_path / "c"), _rows(per_label=1))
    path = os.path.join(src, "crisismmd_datasplit_all", "task_humanitarian_text_img_test.tsv")
    with open(path) as f:
        text = f.read().replace("label_image", "label_img", 1)
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(BadInput, match=r"no column 'label_image'"):
        run_prep(tmp_path / "o", dataset="crisismmd", source=src)
