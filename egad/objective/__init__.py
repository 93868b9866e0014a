"""The objective: the per-token plan composed with divergences and features, and the chunked head-and-loss engine."""
