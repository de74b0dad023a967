"""DeepSpeed engines and what builds them: the DeepSpeed JSON, models and where they come from, adapters, the optimizer, and every patch of DeepSpeed internals."""
