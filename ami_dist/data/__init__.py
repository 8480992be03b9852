"""Data: readers for parallel text and PersonaChat dialogs, the shared vocabulary, batching across ranks."""
