"""Models: LLaVA-1.5 presets, the offline tokenizer, loading/conversion of both checkpoint layouts, prompts; CLIP."""
