"""Language/encoder models (GPT-2, Llama-style, BERT) via nnsight: ``massact llm-stats``."""
