import os
import re

import pytest
from dataset_layouts import make_dtd, write, write_truncated_jpeg
from prep_helpers import read_outputs, run_prep, skipped_reasons

from mysproj.cli import main
from mysproj.errors import EXIT_BAD_INPUT, BadInput

PROMPT = re.compile(r'^<image>\nClassify this image into one of the following categories relating to textures: '
                    r'(?P<classes>.+)\. Only output a single final classification label and NOTHING ELSE\.$')


def test_dtd_split1_counts_labels_formats(tmp_path):
    dtd = make_dtd(str(tmp_path / "src"), classes=("banded", "blotchy", "zigzagged"), per_split=3)
    # a corrupt image and a non-image file listed in train1, a listed-but-missing one in test1
    write_truncated_jpeg(os.path.join(dtd, "images", "banded", "banded_9001.jpg"))
    write(os.path.join(dtd, "images", "blotchy", "notes.txt"), b"not an image")
    with open(os.path.join(dtd, "labels", "train1.txt"), "a") as f:
        f.write("banded/banded_9001.jpg\nblotchy/notes.txt\n\n")
    with open(os.path.join(dtd, "labels", "test1.txt"), "a") as f:
        f.write("zigzagged/zigzagged_9999.jpg\n")
    out = tmp_path / "out"
    manifest = run_prep(out, dataset="dtd", source=str(tmp_path / "src"))  # parent of dtd/ is accepted
    o = read_outputs(out)

    assert o["classes"] == {"classes": ["banded", "blotchy", "zigzagged"], "task": "textures", "dataset": "dtd",
                            "label_underscores": "space", "prompt_style": "paper"}
    rep = o["report"]
    assert rep["counts"]["train"]["per_class"] == {"banded": 3, "blotchy": 3, "zigzagged": 3}
    assert rep["counts"]["test"]["total"] == 9
    reasons = skipped_reasons(rep)
    assert reasons["banded_9001.jpg"].startswith("corrupt image")
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["zigzagged_9999.jpg"] == "listed in test1.txt but missing"
    assert rep["skipped_count"] == 3
    assert manifest["summary"]["skipped"] == 3

    samples = o["samples"]
    assert len(samples) == 18
    assert {s["split"] for s in samples} == {"train", "test"}
    for s in samples:
        assert os.path.isabs(s["image"]) and os.path.exists(s["image"])
        assert s["label_id"] == ["banded", "blotchy", "zigzagged"].index(s["label"])
        assert (s["width"], s["height"]) == (24, 16) and len(s["sha256"]) == 64
    # val1 images are not used
    assert not any("val" in s["relpath"] for s in samples)

    assert o["train_csv"][0] == ["imagefilename", "label"]
    assert sorted(r[1] for r in o["train_csv"][1:]) == sorted(s["label"] for s in samples if s["split"] == "train")
    recs = o["llava_train"]
    assert [r["id"] for r in recs] == [f"{i:09d}" for i in range(9)]
    orders = set()
    for rec, row in zip(recs, o["train_csv"][1:]):
        assert rec["image"] == row[0]
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt == {"from": "gpt", "value": row[1]}
        m = PROMPT.match(human["value"])
        assert m, human["value"]
        quoted = m["classes"].split(", ")
        assert sorted(quoted) == ['"banded"', '"blotchy"', '"zigzagged"']
        orders.add(tuple(quoted))
    assert len(orders) > 1  # re-shuffled per example
    assert set(manifest["files"]) == {"samples.parquet", "train.csv", "test.csv", "llava_train.json",
                                      "llava_test.json", "classes.json", "prep_report.json"}


def test_prompt_order_is_seeded(tmp_path):
    src = make_dtd(str(tmp_path / "src"))
    run_prep(tmp_path / "a", dataset="dtd", source=src, seed=3)
    run_prep(tmp_path / "b", dataset="dtd", source=src, seed=3)
    run_prep(tmp_path / "c", dataset="dtd", source=src, seed=4)
    a, b, c = (read_outputs(tmp_path / x)["llava_train"] for x in "abc")
    assert a == b
    assert [r["conversations"][0]["value"] for r in a] != [r["conversations"][0]["value"] for r in c]


def test_code_prompt_style_and_deleted_underscores(tmp_path):
    src = make_dtd(str(tmp_path / "src"), classes=("banded", "bell_pepper"), per_split=1)
    run_prep(tmp_path / "o", dataset="dtd", source=src, prompt_style="code", label_underscores="delete",
             task="surface patterns")
    o = read_outputs(tmp_path / "o")
    assert o["classes"]["classes"] == ["banded", "bellpepper"]
    value = o["llava_test"][0]["conversations"][0]["value"]
    assert value.endswith("NOTHING ELSE.\n\nOutput:")
    assert "relating to surface patterns: " in value


def test_dtd_missing_split_file(tmp_path):
    src = make_dtd(str(tmp_path / "src"))
    os.remove(os.path.join(src, "labels", "test1.txt"))
    with pytest.raises(BadInput, match=r"split file .*test1\.txt is missing"):
        run_prep(tmp_path / "o", dataset="dtd", source=src)
    assert not os.path.exists(tmp_path / "o" / "_SUCCESS.json")


@pytest.mark.parametrize("line", ["../x.jpg", "banded/../../secret.jpg", "/etc/passwd"])
def test_dtd_path_escaping_root(tmp_path, line):
    src = make_dtd(str(tmp_path / "src"))
    with open(os.path.join(src, "labels", "train1.txt"), "a") as f:
        f.write(line + "\n")
    with pytest.raises(BadInput, match=r"train1\.txt line 10: .* escapes the dataset root"):
        run_prep(tmp_path / "o", dataset="dtd", source=src)


def test_dtd_empty_class_folder(tmp_path):
    src = make_dtd(str(tmp_path / "src"))
    os.makedirs(os.path.join(src, "images", "woven"))
    with pytest.raises(BadInput, match=r"class folder .*woven holds no files"):
        run_prep(tmp_path / "o", dataset="dtd", source=src)


def test_dtd_class_whose_images_are_all_corrupt(tmp_path):
    src = make_dtd(str(tmp_path / "src"), classes=("banded", "blotchy", "zigzagged"), per_split=1)
    for name in os.listdir(os.path.join(src, "images", "zigzagged")):
        write_truncated_jpeg(os.path.join(src, "images", "zigzagged", name))
    with pytest.raises(BadInput, match=r"class 'zigzagged' .* has no usable images"):
        run_prep(tmp_path / "o", dataset="dtd", source=src)


def test_dtd_fewer_than_two_classes(tmp_path):
    src = make_dtd(str(tmp_path / "src"), classes=("banded",), per_split=2)
    with pytest.raises(BadInput, match=r"1 class\(es\) .* at least two"):
        run_prep(tmp_path / "o", dataset="dtd", source=src)


def test_cli_bad_input_exits_64_with_one_error_line(tmp_path, capsys):
    src = make_dtd(str(tmp_path / "src"))
    os.remove(os.path.join(src, "labels", "train1.txt"))
    rc = main(["prep", "--dataset", "dtd", "--source", src, "--out", str(tmp_path / "o"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train1.txt is missing" in errors[0]
    assert not err.count("Traceback")


def test_cli_missing_source_and_bad_value_exit_64(tmp_path, capsys):
    assert main(["prep", "--dataset", "dtd", "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "'source' is required" in capsys.readouterr().err
    assert main(["prep", "--dataset", "dtd", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--dtd-split", "11"]) == EXIT_BAD_INPUT
    assert "'dtd_split' = 11: must be <= 10" in capsys.readouterr().err
    assert main(["prep", "--dataset", "dtd", "--source", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
