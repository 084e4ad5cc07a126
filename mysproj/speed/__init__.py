"""Speed paths, one module per model family (`llava`, `clip`): each trick is switched on by its stage config field
and its on/off rules and setup live in that family's module; the stages call it and never decide again. The
mechanisms themselves sit beside the model code (`models.fp8`, `models.shared_prefix`, `models.clip_tower`,
`evaluation.greedy`, `evaluation.device_decode`)."""
