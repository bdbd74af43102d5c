"""Pretraining and fine-tuning loops, sampling, schedules, cross-validation and the masking
comparison."""
