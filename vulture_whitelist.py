"""Names vulture (`make lint`) would call unused, and why they are not. vulture reads this file, nobody runs it.
Anything new here needs its reason; code that is really unused is deleted instead."""
# ruff: noqa
# fmt: off

# Entry points reached by name: the stage registry's lazy boundary loads these as "module:function" strings.
stage_remote_inputs  # mysproj.stages.fetch, via mysproj.stages.registry.load

# Attributes third-party code reads: Pillow's decompression-bomb limit, transformers' config and tokenizer
# attributes, the Kaggle client's request fields, tarfile's owner fields (cleared before extraction), a
# torch.nn.Module's repr hook, the processor output's image list.
_.MAX_IMAGE_PIXELS
_.architectures
_.pre_tokenizer
_.post_processor
_.dataset_slug
_.owner_slug
_.dataset_version_number
_.gid
_.gname
_.uname
_.extra_repr
_.pil_images

# Signatures a caller fixes: signal handlers (signum, frame) and a context manager's __exit__(*exc).
frame
exc

# A dataset record's field: the terms of its origin, kept with the record (docs/stage-in.md shows them); no code reads it.
licence

# Used by the tests only, as fixtures or reference implementations (tests/ is not scanned: pytest's hooks and
# fixtures would all read as unused).
LLAVA_ORIGIN
_.list_events
attempts
original_to_hf
read_weights
write_original

# The extension API (docs/extending.md): a new stage's record and a new dataset's record are added with these; the
# tests' toy stage uses them.
register
unregister

# Typed summary fields (mysproj.config.summaries): the keys of a manifest's summary, which the stages write as JSON
# and `summary_of` reads back; no code reads these by attribute (people read them in the manifest).
bytes_total
reused
accuracy
macro_f1
pre_macro_f1
post_macro_f1
pre_accuracy
post_accuracy
