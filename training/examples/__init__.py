"""Runnable worked examples of training (see README, Training)."""
