"""prg_fast.train moved to prg_fast.training.pretrain (the changelog in README.md says so);
importing the old path fails, naming the new one. The attribute prg_fast.train is still the pretraining module."""
raise ModuleNotFoundError("prg_fast.train moved to prg_fast.training.pretrain: import that instead (prg_fast.train, "
                          "the attribute, is still the pretraining module)", name=__name__)
