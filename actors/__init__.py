"""Thin Ray wrappers over plain classes: the generation actor, the context cache, the stats collector."""
