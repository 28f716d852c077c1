"""Training: the shared run-time (`runs`) under pretraining, finetuning and the related systems."""
