"""ami-dist: distributed Adversarial Mutual Information (AMI) training for text generation."""

__version__ = "0.1.0"
