"""SLMRec: ID-based sequential recommenders (SASRec) and LLM-based ones distilled from deep to shallow."""
