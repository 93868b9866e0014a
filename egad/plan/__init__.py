"""The per-token plan's components, pure functions of the teacher's entropy: entropy and its CDF, curriculum,
temperature, routing."""
