"""recserve perf: perf_analyzer-based load, capacity finding, tuning and reports."""
