"""Builds the offline demo: a corpus from the Python standard library, its tokenizer, and a small target model.

Nothing here is needed at generation time; the demo only produces files that load like any hub model.
"""
