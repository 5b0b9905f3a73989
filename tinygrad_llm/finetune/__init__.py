"""Finetuning: instruction prompts (here), classification, LoRA and DPO (later chapters)."""
