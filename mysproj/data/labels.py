"""Label strings from folder names / dataset label columns (docs/paper.md#the-released-scripts).

The released code's format script deletes underscores (`Bell_pepper leaf spot` -> `Bellpepper leaf spot`); its probe
script and the paper's Figure 3 turn them into spaces. Spaces are the default, `delete` the option. Case is kept.
"""

from __future__ import annotations

UNDERSCORE_RULES = ("space", "delete")


def normalise_label(name: str, underscores: str = "space") -> str:
    if underscores not in UNDERSCORE_RULES:
        raise ValueError(f"underscores must be one of {UNDERSCORE_RULES}, got {underscores!r}")
    if underscores == "delete":
        return name.strip().replace("_", "")
    # Collapse the runs of whitespace a leading/double underscore would leave behind.
    return " ".join(name.replace("_", " ").split())


def ordered_classes(labels) -> list[str]:
    """The class list: sorted normalised names; label ids are positions in it."""
    return sorted(set(labels))
