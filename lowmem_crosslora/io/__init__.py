"""Readers and writers: model checkpoints (safetensors, GGUF), adapters, the run state and outputs."""
