"""fedpeft: federated, differentially private fine-tuning of parameter-efficient adapters."""

__version__ = "0.1.0"
