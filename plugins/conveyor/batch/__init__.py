"""Batch scoring: readers (the input), scoring (the worker pool), parts (the output folder),
warehouse (the SQL table), runs (what a run scores and leaves behind)."""
