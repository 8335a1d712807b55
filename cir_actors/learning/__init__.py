"""Learning: the DeepSpeed learner ranks, the loss, advantages, weight publication and the SFT
warm start."""
