"""Plain-PyTorch local training and evaluation (no Flower here: testable on tensors)."""
