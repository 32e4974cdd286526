"""Training: the loop, evaluation, the optimizer and schedule, datasets and loaders from a config, fine-tuning, output folders."""
