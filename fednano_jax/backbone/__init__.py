"""The experiment's backbone: presets of the paper's shapes, pretraining the small one, loading and caching checkpoints."""
