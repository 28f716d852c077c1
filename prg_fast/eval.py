"""prg_fast.eval moved to prg_fast.training.evaluate (the changelog in README.md says so);
importing the old path fails, naming the new one. The attribute prg_fast.eval is still the evaluation module."""
raise ModuleNotFoundError("prg_fast.eval moved to prg_fast.training.evaluate: import that instead (prg_fast.eval, "
                          "the attribute, is still the evaluation module)", name=__name__)
