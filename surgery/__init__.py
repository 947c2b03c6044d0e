"""model-surgery: repair language-model checkpoints after the fact."""

__version__ = "0.1.0"
