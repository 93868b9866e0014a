"""Models: loading teacher, student and tokenizer; model files; LM heads; LoRA; engines; checkpoints."""
