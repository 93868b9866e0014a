"""Configuration: the dataclasses, value coercion, the run config, presets and the method registry."""
