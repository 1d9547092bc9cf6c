"""Offline CLIP2Scene training: pre-training, fine-tuning and evaluation (CLIs + engine)."""
