"""prg_fast.finetune moved to prg_fast.training.finetune (the changelog in README.md says so);
importing the old path fails, naming the new one. The attribute prg_fast.finetune is still the finetune function."""
raise ModuleNotFoundError("prg_fast.finetune moved to prg_fast.training.finetune: import that instead (prg_fast.finetune, "
                          "the attribute, is still the finetune function)", name=__name__)
