"""Datasets on disk -> prepared samples: image checks, label rules, the paper's prompt, one reader per layout."""
