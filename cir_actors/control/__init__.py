"""Control: the budget scheduler (version, tool budget, admission), the replay buffer, and the
driver of a training run."""
