"""evomerge: search for the best merge of fine-tuned checkpoints of one model."""

__version__ = "0.1.0"
