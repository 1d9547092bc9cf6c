"""Training engine: configs, teacher cache, data pipeline, objectives, loop, DDP helpers."""
