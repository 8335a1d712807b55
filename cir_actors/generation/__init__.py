"""Generation: the vLLM engine, loading new weights into it, the multi-turn code-integrated
rollout, and the rollout worker (the `generator-<i>` actor)."""
