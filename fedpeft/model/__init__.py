"""Pretrained backbone loading (embedded offline default or Hugging Face hub/local path)."""
