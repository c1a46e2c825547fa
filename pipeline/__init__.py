"""The Ray Data dataflow: config, input and row validation, resources, build_pipeline."""
