"""Thin Ray wrappers over plain classes: the generation actor, the shared context cache actor, stats."""
