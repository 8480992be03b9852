"""Decoding (greedy now; beam search and reranking later)."""
