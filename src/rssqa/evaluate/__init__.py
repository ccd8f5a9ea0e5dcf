"""Evaluation of CLIP models on remote-sensing tasks: zero-shot scene classification and image-text retrieval."""
