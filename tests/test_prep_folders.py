import os

import pytest
from dataset_layouts import make_imagefolder, write, write_image, write_truncated_jpeg
from prep_helpers import read_outputs, run_prep, skipped_reasons

from mysproj.data.prepared import PreparedData
from mysproj.errors import BadInput, IncompleteOutput


def _plantdoc(root):
    make_imagefolder(root, {
        "train": {"Apple Scab Leaf": 3, "Bell_pepper leaf spot": 2, "Tomato two spotted spider mites leaf": 2},
        "test": {"Apple Scab Leaf": 2, "Bell_pepper leaf spot": 1},
    })
    # extensions vary; some files do not decode
    write_image(os.path.join(root, "train", "Apple Scab Leaf", "upper.JPG"), 1)
    write_image(os.path.join(root, "train", "Apple Scab Leaf", "long.jpeg"), 2)
    write_image(os.path.join(root, "test", "Bell_pepper leaf spot", "p.png"), 3)
    write_truncated_jpeg(os.path.join(root, "train", "Bell_pepper leaf spot", "broken.jpg"))
    write(os.path.join(root, "test", "Apple Scab Leaf", "empty.jpg"), b"")
    write(os.path.join(root, "train", "stray.jpg"), b"x")
    write(os.path.join(root, "train", "Apple Scab Leaf", ".DS_Store"), b"\0\0")
    return root


def test_plantdoc_labels_train_only_class_and_bad_files(tmp_path):
    src = _plantdoc(str(tmp_path / "PlantDoc-Dataset"))
    run_prep(tmp_path / "o", dataset="plantdoc", source=src)
    o = read_outputs(tmp_path / "o")
    classes = ["Apple Scab Leaf", "Bell pepper leaf spot", "Tomato two spotted spider mites leaf"]
    assert o["classes"]["classes"] == classes
    assert o["classes"]["task"] == "plant leaf diseases"
    rep = o["report"]
    assert rep["counts"]["train"]["per_class"] == {"Apple Scab Leaf": 5, "Bell pepper leaf spot": 2,
                                                   "Tomato two spotted spider mites leaf": 2}
    assert rep["counts"]["test"]["per_class"] == {"Apple Scab Leaf": 2, "Bell pepper leaf spot": 2,
                                                  "Tomato two spotted spider mites leaf": 0}
    assert rep["classes_missing_in_split"] == {"test": ["Tomato two spotted spider mites leaf"]}
    reasons = skipped_reasons(rep)
    assert reasons["broken.jpg"].startswith("corrupt image")
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["stray.jpg"] == "not inside a class folder"
    assert reasons[".DS_Store"] == "hidden file"
    assert rep["skipped_by_reason"] == {"corrupt image": 1, "empty file": 1, "hidden file": 1,
                                        "not inside a class folder": 1}
    # every class still appears in each test prompt, the train-only one included
    prompt = o["llava_test"][0]["conversations"][0]["value"]
    assert all(f'"{c}"' in prompt for c in classes)
    assert {r[1] for r in o["test_csv"][1:]} == {"Apple Scab Leaf", "Bell pepper leaf spot"}


def test_plantdoc_underscores_deleted_like_the_seed_script(tmp_path):
    src = _plantdoc(str(tmp_path / "p"))
    run_prep(tmp_path / "o", dataset="plantdoc", source=src, label_underscores="delete")
    assert "Bellpepper leaf spot" in read_outputs(tmp_path / "o")["classes"]["classes"]


def test_dermnet_layout_and_prepared_reader(tmp_path):
    names = ["Acne and Rosacea Photos", "Eczema Photos", "Vascular Tumors"]
    src = make_imagefolder(str(tmp_path / "dermnet"), {"train": {n: 3 for n in names}, "test": {n: 1 for n in names}})
    run_prep(tmp_path / "o", dataset="dermnet", source=src)
    data = PreparedData(str(tmp_path / "o"))
    assert data.classes == names and data.task == "skin diseases"
    test = data.samples("test")
    assert [s.label for s in test] == names
    assert [s.label_id for s in test] == [0, 1, 2]
    assert len(data.samples("train")) == 9
    assert data.llava_records("test")[2]["conversations"][1]["value"] == "Vascular Tumors"
    img = data.open_image(test[0])
    assert img.mode == "RGB" and img.size == (24, 16)
    # a changed image no longer matches the sha256 prep recorded
    write_image(test[0].image, 4242)
    with pytest.raises(IncompleteOutput, match="sha256"):
        data.local_image(test[0])


def test_imagefolder_custom_split_names_and_cap(tmp_path):
    src = make_imagefolder(str(tmp_path / "mine"), {"training": {"cat": 5, "dog": 5}, "val": {"cat": 2, "dog": 2}},
                           ext=".png")
    run_prep(tmp_path / "o", dataset="imagefolder", source=src, train_split="training", test_split="val",
             max_per_class=3)
    rep = read_outputs(tmp_path / "o")["report"]
    assert rep["counts"]["train"]["per_class"] == {"cat": 3, "dog": 3}
    assert rep["counts"]["test"]["per_class"] == {"cat": 2, "dog": 2}


def test_imagefolder_missing_split_folder(tmp_path):
    src = make_imagefolder(str(tmp_path / "mine"), {"train": {"cat": 1, "dog": 1}})
    with pytest.raises(BadInput, match=r"split folder .*/test is missing or empty"):
        run_prep(tmp_path / "o", dataset="imagefolder", source=src)


def test_imagefolder_empty_class_folder(tmp_path):
    src = make_imagefolder(str(tmp_path / "mine"), {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}})
    os.makedirs(os.path.join(src, "test", "bird"))
    with pytest.raises(BadInput, match=r"class folder .*/test/bird holds no files"):
        run_prep(tmp_path / "o", dataset="imagefolder", source=src)


def test_imagefolder_one_class(tmp_path):
    src = make_imagefolder(str(tmp_path / "mine"), {"train": {"cat": 2}, "test": {"cat": 1}})
    with pytest.raises(BadInput, match="at least two"):
        run_prep(tmp_path / "o", dataset="imagefolder", source=src)


def test_worker_pool_gives_the_same_result_as_one_worker(tmp_path):
    src = make_imagefolder(str(tmp_path / "many"), {"train": {"a": 40, "b": 40}, "test": {"a": 5, "b": 5}})
    write_truncated_jpeg(os.path.join(src, "train", "a", "zz_bad.jpg"))
    run_prep(tmp_path / "one", dataset="imagefolder", source=src, workers=1)
    run_prep(tmp_path / "two", dataset="imagefolder", source=src, workers=2)
    one, two = read_outputs(tmp_path / "one"), read_outputs(tmp_path / "two")
    assert one["samples"] == two["samples"] and len(one["samples"]) == 90
    assert one["report"]["skipped"] == two["report"]["skipped"]
    assert skipped_reasons(two["report"])["zz_bad.jpg"].startswith("corrupt image")
