"""Data: instruction records, prompt templates, tokenisation and batching, on-policy rollouts."""
