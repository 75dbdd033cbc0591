"""shapes-llava: a small LLaVA trained from scratch on the synthetic GQA-format world (`train`), its model card
(`card`) and its checkpoint (`checkpoint/`)."""
