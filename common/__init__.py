"""What actors/ and pipeline/ share: the job config (`config.py`) and the columns (`columns.py`)."""
