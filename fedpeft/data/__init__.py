"""Datasets (embedded offline defaults and Hugging Face loading) and partitioning."""
