"""shapes-llava: a small LLaVA trained from scratch on the synthetic GQA-format world (`train`, whose docstring
lists the recipe's rooms), its model card (`card`) and its checkpoint (`checkpoint/`)."""
