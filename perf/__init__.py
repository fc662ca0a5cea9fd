"""recserve perf: perf_analyzer-based load, capacity finding, tuning and reports."""

if __name__ != "recserve.perf":  # one import identity: a second copy of every module would split their state
    raise ImportError(f"import recserve.perf, not {__name__} (the folder perf/ is the package recserve.perf)")
