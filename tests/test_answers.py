import pytest

from mysproj.evaluation.answers import AnswerParser, normalise

DTD = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
       "striped", "zigzagged", "lined", "dotted", "polka-dotted"]
PLANTS = ["Apple Scab Leaf", "Bell pepper leaf spot", "Tomato leaf", "Tomato leaf bacterial spot",
          "Corn leaf blight", "Squash Powdery mildew leaf"]
CRISIS = ["affected individuals", "infrastructure and utility damage", "vehicle damage",
          "rescue volunteering or donation effort"]

CASES = [
    # (classes, answer, expected label, how)
    (DTD, "banded", "banded", "exact"),
    (DTD, "Banded", "banded", "exact"),
    (DTD, '"striped"', "striped", "exact"),
    (DTD, "'Zigzagged'.", "zigzagged", "exact"),
    (DTD, "  cracked\n", "cracked", "exact"),
    (DTD, "Output: bumpy", "bumpy", "contained"),
    (DTD, "The texture in this image is best described as \"cobwebbed\".", "cobwebbed", "contained"),
    (DTD, "This image shows a polka-dotted pattern.", "polka-dotted", "contained"),  # longest beats "dotted"
    (DTD, "polka dotted", "polka-dotted", "exact"),
    (DTD, "It is either banded or dotted", None, "unparsed"),  # two names of equal length: ambiguous
    (DTD, "crosshatched, maybe cracked", "crosshatched", "contained"),  # two names: the longest wins
    (DTD, "I cannot determine the texture.", None, "unparsed"),
    (DTD, "", None, "unparsed"),
    (DTD, "chequred", "chequered", "close"),
    (DTD, "The pattern looks zig-zaggd", None, "unparsed"),
    (DTD, "It looks bandedd to me", "banded", "close"),
    (DTD, "outlined shapes", None, "unparsed"),  # a class name inside another word is not contained
    (PLANTS, "tomato leaf bacterial spot", "Tomato leaf bacterial spot", "exact"),
    (PLANTS, "Tomato Leaf Bacterial Spot.", "Tomato leaf bacterial spot", "exact"),
    (PLANTS, "This is a Tomato leaf with bacterial spot", "Tomato leaf", "contained"),
    (PLANTS, "bell_pepper leaf spot", "Bell pepper leaf spot", "exact"),
    (PLANTS, "Apple Scab Leaf</s>", "Apple Scab Leaf", "contained"),
    (PLANTS, "Aple scab leaf", "Apple Scab Leaf", "close"),
    (CRISIS, "vehicle_damage", "vehicle damage", "exact"),
    (CRISIS, "Infrastructure and utility damage", "infrastructure and utility damage", "exact"),
    (CRISIS, "The category is: rescue volunteering or donation effort.", "rescue volunteering or donation effort",
     "contained"),
    (CRISIS, "Damage to vehicles", None, "unparsed"),
]


@pytest.mark.parametrize("classes,answer,label,how", CASES)
def test_parser_table(classes, answer, label, how):
    got = AnswerParser(classes)(answer)
    assert (got.label, got.how) == (label, how)


def test_close_match_threshold_is_an_option():
    assert AnswerParser(DTD, close_match=0.95)("chequred").label is None
    assert AnswerParser(DTD, close_match=0.8)("chequred").label == "chequered"


def test_normalise():
    assert normalise('  "Bell_Pepper"  leaf-spot!! ') == "bell pepper leaf spot"


def test_colliding_class_names_are_rejected():
    with pytest.raises(ValueError, match="normalise to the same"):
        AnswerParser(["leaf spot", "Leaf_Spot"])
