"""Stands in for flash-attn's compiled extension (its import is what the plugin's probe checks)."""
