"""Training: the run (train.py) and its loop (trainer.py), evaluation, the optimizer and schedule, datasets and
loaders from a config, fine-tuning, output folders."""
