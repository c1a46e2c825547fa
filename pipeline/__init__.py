"""The Ray Data dataflow: input and row validation, resources, resume, the pipeline and the job summary."""
