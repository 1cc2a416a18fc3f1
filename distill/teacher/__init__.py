"""Teacher side: checkpoint preparation, the vLLM labelling engine, and a transformers reference."""
