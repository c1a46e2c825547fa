"""The real model and real data, built offline from package-registry assets: SmolLM2-135M-Instruct converted from
its GGUF into a plain Hugging Face folder, ShareGPT conversations, and HumanEval prompts.

Nothing here runs at generation time; it only produces files that load like any hub model or Parquet file.
"""
