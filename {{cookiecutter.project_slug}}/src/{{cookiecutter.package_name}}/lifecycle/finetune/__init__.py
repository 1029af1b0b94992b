"""LoRA fine-tuning: chat data (`data`), training and merging (`train`), and the tracked job that
registers and promotes the result (`pipeline`)."""
