"""Studies: the ablation sweep and its report, the benchmark and its report, official-checkpoint conversion."""
