"""mergesearch: search for the best merge of fine-tuned LLMs."""
__version__ = "0.1.0"
