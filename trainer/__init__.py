"""LoRA fine-tuning: data loading, training, export of a PEFT adapter with an adapterctl manifest."""
