"""Speed paths, one module per model family (`llava`, `clip`): each trick is switched on by its stage config field,
and its on/off rules and setup live in that family's module; the stages, the fine-tuning session and the benches
call it and never decide again. The mechanisms sit beside the model code (`models.fp8`, `models.shared_prefix`,
`models.clip_tower`, `evaluation.greedy`, `evaluation.device_decode`), so this package is a layer with training
and the stages: it imports models and evaluation, and only training, stages and bench import it."""
